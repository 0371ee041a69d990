"""Trace a PyTorch model into a torch.fx graph whose nodes know which module they came from, and find the
candidate split points ("after module X") with the tensors that cross each cut.

A cut after module ``X`` sits after the last graph node produced inside ``X``. Every tensor produced at or
before that node and consumed after it crosses the cut; a cut is a *single tensor* cut when exactly one
does (a plain sequential boundary), otherwise (inside a residual block) all crossing tensors are listed.
"""
from __future__ import annotations

import contextlib
import difflib
import io
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp


class SplitError(ValueError):
    """A split point or exit name that does not exist or cannot be used; the message lists valid ones."""


class TracingError(ValueError):
    """The model cannot be traced into one static graph (e.g. its ``forward`` branches on a tensor value);
    the message names the module and the line, and says what to change."""


class _ScopeTracer(fx.Tracer):
    """fx tracer that records, for each node, the stack of module paths it was created in, and the
    innermost module whose ``forward`` failed to trace."""

    def __init__(self) -> None:
        super().__init__()
        self._scope: list[str] = []
        self.failed_in: tuple[str, str] | None = None  # (module path, class name)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self._scope.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except fx.proxy.TraceError:
            if self.failed_in is None:
                self.failed_in = (path, type(m).__name__)
            raise
        finally:
            self._scope.pop()

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["scope"] = tuple(self._scope)
        return node


def _user_line(error: BaseException) -> str:
    """``file:line (`code`)`` of the innermost traceback frame outside torch (the model's own code)."""
    import os
    import traceback

    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(torch_dir)]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno} (`{(f.line or '').strip()}`)"


def _untraceable(error: fx.proxy.TraceError, tracer: _ScopeTracer, model: torch.nn.Module) -> TracingError:
    path, cls = tracer.failed_in or ("", type(model).__name__)
    where = f"module {path!r} ({cls})" if path else f"the model's own forward ({cls})"
    line = _user_line(error)
    control_flow = "control flow" in str(error) or "iterated" in str(error)
    why = ("its forward takes a Python branch (if / while / for / len) on a tensor's value or shape, which "
           "one static graph (ONNX, TFLite) cannot hold" if control_flow else f"torch.fx cannot trace it ({error})")
    return TracingError(
        f"cannot trace {where}" + (f" at {line}" if line else "") + f": {why}. eetool exports one static "
        "path through the model: write that forward without value-dependent Python control flow (torch.where "
        "for element-wise choices). Input-dependent early exiting is supported the other way round: each exit "
        "is a separate branch (eetool exits train ... --exits NAME, then export --exits DIR) and the runtime "
        "takes the exit decision per input from the branch's confidence threshold."
    )



@dataclass
class Cut:
    """A candidate split point.

    ``position`` indexes the last node of module ``name`` in :attr:`TracedModel.nodes`; ``crossing`` are
    the names of the fx nodes whose tensors cross the cut, with ``shapes`` (batch dim included, as traced).
    """

    name: str
    position: int
    crossing: list[str]
    shapes: list[tuple[int, ...]]
    aliases: list[str] = field(default_factory=list)

    @property
    def single_tensor(self) -> bool:
        return len(self.crossing) == 1

    def nchw_problem(self) -> str | None:
        """Why the cut is not one NCHW feature map (what a bottleneck or a channel transform needs), as the end
        of a sentence about it, e.g. ``is crossed by 2 tensors (...)``; None when it is one."""
        if not self.single_tensor:
            return (f"is crossed by {len(self.crossing)} tensors (a single-tensor cut is needed: 'eetool inspect' "
                    f"marks them)")
        if len(self.shapes[0]) != 4:
            return f"carries a {len(self.shapes[0])}-D tensor of shape {tuple(self.shapes[0])}, not an NCHW feature map"
        return None

    def elements_per_sample(self) -> int:
        """Number of scalars per sample that cross the cut (batch dimension excluded)."""
        total = 0
        for shape in self.shapes:
            n = 1
            for d in shape[1:]:
                n *= int(d)
            total += n
        return total


class TracedModel:
    """A model traced with torch.fx and shape-propagated on ``sample`` (float32, NCHW, batch first).

    Raises ``TracingError`` when the model has no static graph (naming the module and line), and
    ``SplitError`` for unknown module names (listing the closest valid ones)."""

    def __init__(self, model: torch.nn.Module, sample: torch.Tensor):
        model = model.eval()
        self.model = model
        tracer = _ScopeTracer()
        try:
            graph = tracer.trace(model)
        except fx.proxy.TraceError as e:
            raise _untraceable(e, tracer, model) from None
        self.gm = fx.GraphModule(model, graph)
        try:  # (ShapeProp prints the traceback of a failing node itself: keep it for the error below)
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                ShapeProp(self.gm).propagate(sample)
        except RuntimeError as e:  # e.g. a channel count the first layer does not take
            cause = (e.__cause__ or e)
            raise TracingError(f"{type(model).__name__} cannot run on an input of shape {tuple(sample.shape)}: "
                               f"{str(cause).strip().splitlines()[0]}; check --input-shape (NCHW, batch first) "
                               "and the data's shape") from None
        self.nodes = [n for n in self.gm.graph.nodes if n.op not in ("get_attr", "output")]
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.output_node = next(n for n in self.gm.graph.nodes if n.op == "output")
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self._last_user = self._compute_last_users()
        self.module_paths = self._module_paths()

    def _compute_last_users(self) -> dict[str, int]:
        last: dict[str, int] = {}
        end = len(self.nodes)
        for n in self.gm.graph.nodes:
            pos = end if n.op == "output" else self.index.get(n.name)
            if pos is None:
                continue
            for a in n.all_input_nodes:
                if a.name in self.index:
                    last[a.name] = max(last.get(a.name, -1), pos)
        return last

    def _module_paths(self) -> dict[str, int]:
        """Module path -> position of its last node, for every module that produced a node."""
        last: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for path in n.meta.get("scope", ()):
                if path:
                    last[path] = i
        return last

    def crossing_at(self, position: int) -> list[str]:
        """Names of the nodes produced at or before ``position`` and used after it, in graph order."""
        return [n.name for n in self.nodes[: position + 1] if self._last_user.get(n.name, -1) > position]

    def shape_of(self, node_name: str) -> tuple[int, ...]:
        meta = self.nodes[self.index[node_name]].meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise SplitError(f"tensor {node_name!r} is not a single tensor (tuple or non-tensor value)")
        return tuple(int(d) for d in meta.shape)

    def cut(self, name: str) -> Cut:
        """The cut after module ``name`` (a module path such as ``blocks.5`` or ``layer3.0.conv1``)."""
        if name not in self.module_paths:
            raise SplitError(f"unknown split point {name!r}; nearest valid: {', '.join(self.nearest(name))} "
                             f"(run 'eetool inspect' for the full list)")
        pos = self.module_paths[name]
        if pos >= self._final_position():
            raise SplitError(f"{name!r} ends the model: nothing would be left for the tail; "
                             f"nearest valid: {', '.join(c.name for c in self.candidates()[-3:])}")
        crossing = self.crossing_at(pos)
        return Cut(name, pos, crossing, [self.shape_of(c) for c in crossing])

    def nearest(self, name: str, n: int = 5) -> list[str]:
        """The ``n`` valid module paths closest to ``name`` (difflib ratio)."""
        names = list(self.module_paths)
        close = difflib.get_close_matches(name, names, n=n, cutoff=0.0)
        return close or names[:n]

    def candidates(self, max_depth: int = 2) -> list[Cut]:
        """Candidate cuts after every module at most ``max_depth`` levels deep, one per distinct position
        (other names for the same position go to ``aliases``), in graph order; the model's final module
        is left out (its cut would leave an empty tail)."""
        by_pos: dict[int, list[str]] = {}
        final = self._final_position()
        for path, pos in self.module_paths.items():
            if path.count(".") + 1 > max_depth or pos >= final:
                continue
            by_pos.setdefault(pos, []).append(path)
        cuts = []
        for pos in sorted(by_pos):
            # Deepest name first: "blocks.15" says more than "blocks" about where the cut is.
            names = sorted(by_pos[pos], key=lambda p: (-p.count("."), p))
            cut = self.cut(names[0])
            cut.aliases = names[1:]
            cuts.append(cut)
        return cuts

    def _final_position(self) -> int:
        """Position of the node producing the model output: a cut there leaves nothing for the tail."""
        return max(self.index[a.name] for a in self.output_node.all_input_nodes)
