"""Cases of the recurrent layers, attention and the transformer.

Shapes are tiny (a few steps, a few features): each case compiles a scan or an attention
three times. Masked and initial-state inputs (tuples), final-state outputs
(``return_sequences=False``) and causal standard attention are checked against jax.vjp in
test_recurrent.py and test_attention.py.
"""
import bpjax as bp

from .base import LayerCase

CASES = (
    LayerCase("rnn", lambda: bp.rnn(3), (3, 2), batch=2, default=True, crosscheck=False),
    LayerCase("rnn", lambda: bp.rnn(5), (4, 3), batch=3),
    LayerCase("gru", lambda: bp.gru(3), (3, 2), batch=2, default=True, crosscheck=False),
    LayerCase("gru", lambda: bp.gru(5), (4, 3), batch=3),
    LayerCase("lstm", lambda: bp.lstm(3), (3, 2), batch=2, default=True, crosscheck=False),
    LayerCase("lstm", lambda: bp.lstm(5), (4, 3), batch=3),
    LayerCase("bidirectional", lambda: bp.bidirectional(bp.gru(3)), (3, 2), batch=2, default=True, crosscheck=False),
    LayerCase("bidirectional", lambda: bp.bidirectional(bp.rnn(4)), (4, 3), batch=3),
    LayerCase("multi_head_attention", lambda: bp.multi_head_attention(2), (3, 4), batch=2, default=True,
              crosscheck=False),
    LayerCase("multi_head_attention", lambda: bp.multi_head_attention(2), (5, 8), batch=2),
    LayerCase("multi_head_attention", lambda: bp.multi_head_attention(2, causal=True, lean=True, block_size=2),
              (5, 8), batch=2, id="lean-causal"),
    # the Pallas kernels (bpjax/kernels/flash.py) in interpret mode, on a GPU too: T = 20 is two blocks
    # of 16, the second padded; causal skips the block above the diagonal (masks: test_flash.py)
    LayerCase("multi_head_attention",
              lambda: bp.multi_head_attention(2, causal=True, impl="pallas", pallas_blocks=(16, 16),
                                              pallas_interpret=True),
              (20, 8), batch=2, id="pallas-causal"),
    LayerCase("transformer_block", lambda: bp.transformer_block(2), (3, 4), batch=2, default=True,
              crosscheck=False),
    LayerCase("transformer_block", lambda: bp.transformer_block(2), (5, 8), batch=2),
    LayerCase("gpt", lambda: bp.gpt(7, dim=4, num_heads=2, num_layers=1, max_len=4), (3,), batch=2,
              int_input=7, default=True, crosscheck=False),
    LayerCase("gpt", lambda: bp.gpt(11, dim=8, num_heads=2, num_layers=1, max_len=6), (5,), batch=2,
              int_input=11),
)
