"""``dense``: the unmodified model (the reference row of every table)."""

from __future__ import annotations

from capllm.methods.base import Method, register


@register
class Dense(Method):
    name = "dense"
    description = "the unmodified model (reference row)"
    needs_calibration = False
    uses_ratio = False

    def compress_model(self, ctx) -> None:
        ctx.record_untouched()
