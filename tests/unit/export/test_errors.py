"""export.errors.exporter_failures: one rule for reporting a third-party exporter's failure."""

from __future__ import annotations

import pytest

from export.errors import ExportError, VerificationError, exporter_failures


def test_a_foreign_exception_becomes_one_export_error_naming_the_step_and_the_cause():
    with pytest.raises(ExportError, match=r"^ONNX export failed: KeyError: 'aten::foo'$") as info:
        with exporter_failures("ONNX export"):
            raise KeyError("aten::foo")
    assert isinstance(info.value.__cause__, KeyError)


def test_an_export_error_passes_unchanged_and_long_messages_are_cut():
    with pytest.raises(VerificationError, match="^logits differ$"):
        with exporter_failures("ExecuTorch export"):
            raise VerificationError("logits differ")
    with pytest.raises(ExportError) as info:
        with exporter_failures("ExecuTorch export"):
            raise RuntimeError("x" * 5000)
    assert len(str(info.value)) < 600
