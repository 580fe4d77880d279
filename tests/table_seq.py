"""Cross-check table cases for recurrent layers, attention and the transformer (issue 4).

Shapes are tiny (a few steps, a few features): each case compiles a scan or an attention
three times. Masked and initial-state inputs (tuples), final-state outputs
(``return_sequences=False``) and causal standard attention are checked against jax.vjp in
test_recurrent.py and test_attention.py.
"""
import bpjax as bp
from table_base import LayerCase

SEQ_CASES = [
    LayerCase("rnn", lambda: bp.rnn(5), (4, 3), batch=3),
    LayerCase("gru", lambda: bp.gru(5), (4, 3), batch=3),
    LayerCase("lstm", lambda: bp.lstm(5), (4, 3), batch=3),
    LayerCase("bidirectional", lambda: bp.bidirectional(bp.rnn(4)), (4, 3), batch=3),
    LayerCase("multi_head_attention", lambda: bp.multi_head_attention(2), (5, 8), batch=2),
    LayerCase("multi_head_attention", lambda: bp.multi_head_attention(2, causal=True, lean=True, block_size=2),
              (5, 8), batch=2, id="lean-causal"),
    # the Pallas kernels (bpjax/kernels/flash.py) in interpret mode, on a GPU too: T = 20 is two blocks
    # of 16, the second padded; causal skips the block above the diagonal (masks: test_flash.py)
    LayerCase("multi_head_attention",
              lambda: bp.multi_head_attention(2, causal=True, impl="pallas", pallas_blocks=(16, 16),
                                              pallas_interpret=True),
              (20, 8), batch=2, id="pallas-causal"),
    LayerCase("transformer_block", lambda: bp.transformer_block(2), (5, 8), batch=2),
    LayerCase("gpt", lambda: bp.gpt(11, dim=8, num_heads=2, num_layers=1, max_len=6), (5,), batch=2,
              int_input=11),
]
