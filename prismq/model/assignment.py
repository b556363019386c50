"""One check of an assignment {Linear name: format} against a model, shared by export, eval and quantize."""

from __future__ import annotations

from collections.abc import Mapping

from prismq.errors import PrismqError
from prismq.formats import get_format
from prismq.model.linears import LM_HEAD
from prismq.model.siblings import sibling_groups, unit_groups


def check_assignment(assignment: dict[str, str], shapes: Mapping[str, tuple[int, ...]], *,
                     export: bool = True) -> list[list[str]]:
    """Refuse, with a one-line message, an assignment that names a Linear the model lacks (`shapes`: its Linears'
    weight shapes), gives a Linear a format that cannot take its shape, or splits a vLLM layer over formats;
    with `export`, also one no runtime could serve (lm_head compressed, a research format). Returns the groups
    that share scales (`sibling_groups`)."""
    unknown = [name for name in assignment if name not in shapes]
    if unknown:
        raise PrismqError(f"the assignment names {unknown[0]}, which is not a Linear layer of the model"
                          + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    for name, format_name in assignment.items():
        fmt = get_format(format_name)
        if export and name == LM_HEAD and fmt.scheme() is not None:
            raise PrismqError("lm_head must stay BF16: vLLM's ParallelLMHead does not load compressed schemes")
        if export and not fmt.exportable:
            raise PrismqError(f"{name}: {fmt.name} is a research format no runtime serves yet; it cannot be exported")
        reason = fmt.illegal_reason(tuple(shapes[name]))
        if reason:
            raise PrismqError(f"{name}: {fmt.name} {reason}")
    for group in unit_groups(assignment):
        if len({get_format(assignment[n]).name for n in group}) > 1:
            detail = ", ".join(f"{n}={get_format(assignment[n]).name}" for n in group)
            raise PrismqError(f"fused siblings must share one format (vLLM runs them as one kernel): {detail}")
    return sibling_groups(assignment)
