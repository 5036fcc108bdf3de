"""The M2RNN layer: what it hands the ops."""

import pytest

from helpers import random_ids, tiny_model


@pytest.mark.parametrize("conv_kernel_size", [3, None], ids=["conv", "no_conv"])
def test_the_scan_gets_contiguous_inputs(monkeypatch, conv_kernel_size):
    """The layer hands the scan contiguous q, k, v (the Triton op would copy them, in the forward and the backward)."""
    import modeling_m2rnn.layers.m2rnn_mixer as layer_module

    scan, seen = layer_module.m2rnn_scan, []

    def recording_scan(q, k, v, **kwargs):
        seen.append([x.is_contiguous() for x in (q, k, v)])
        return scan(q, k, v, **kwargs)

    monkeypatch.setattr(layer_module, "m2rnn_scan", recording_scan)
    tiny_model("pure", m2rnn_conv_kernel_size=conv_kernel_size)(random_ids(3, 7))
    assert seen == [[True, True, True]] * 3
