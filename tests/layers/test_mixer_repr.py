"""`print(model)` shows each M2RNN layer's shape, as transformers' layers show their sizes."""

from helpers import tiny_model


def test_printing_the_model_shows_the_m2rnn_layers_heads_dims_conv_and_clipping():
    model = tiny_model("pure", m2rnn_gradient_clipping=0.5)
    shown = str(model.model.layers[0].m2rnn).splitlines()[1].strip()
    assert shown == ("heads=4 (q 1, k 1, v 4, f 4, g 2, W 2), K=6, V=5, conv_kernel_size=3, gradient_clipping=0.5, "
                     "residual=True, kernel_backend='auto'")
    assert shown in str(model)


def test_a_layer_without_conv_clipping_or_residual_says_so():
    model = tiny_model("pure", m2rnn_conv_kernel_size=None, m2rnn_gradient_clipping=None, m2rnn_use_residual=False)
    assert "conv_kernel_size=None, gradient_clipping=None, residual=False" in model.model.layers[0].m2rnn.extra_repr()
