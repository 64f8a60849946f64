"""MFU and HFU (Chowdhery et al. 2022, appendix B; Korthikanti et al. 2022 §6.3):
recomputation raises the hardware FLOPs, not the model FLOPs."""
import pytest

import simpar
from simpar import formulas
from simpar.comm.mesh import ParallelConfig
from simpar.train import train

SMALL = dict(seq_len=16, n_layer=2, n_head=2, d_model=16)
B = 4


@pytest.mark.parametrize("layout", [ParallelConfig(), ParallelConfig(tp=2, pp=2)],
                         ids=["1 device", "tp2 x pp2"])
def test_recompute_raises_hfu_not_mfu(layout):
    def job(comm, mode):
        return train(comm, layout, steps=1, batch_size=B, micro_batches=2, model=SMALL,
                     recompute=mode, log_every=0)
    out = {m: simpar.launch(lambda c, m=m: job(c, m), layout.world_size, timeout=60)[0]
           for m in ("none", "selective", "full")}
    model = out["none"]["model_flops"]
    assert {o["model_flops"] for o in out.values()} == {model}          # MFU's numerator
    s, h, L = SMALL["seq_len"], SMALL["d_model"], SMALL["n_layer"]
    assert out["none"]["hardware_flops"] == pytest.approx(model, rel=1e-12)
    assert out["full"]["hardware_flops"] == pytest.approx(
        model + L * formulas.layer_forward_flops(B, s, h), rel=1e-12)    # one more forward
    assert out["selective"]["hardware_flops"] == pytest.approx(
        model + L * formulas.attention_flops(B, s, h), rel=1e-12)        # the attention core
    for o in out.values():
        assert o["hfu_sim"] / o["mfu_sim"] == pytest.approx(o["hardware_flops"] / model)
        assert 0 < o["mfu_sim"] <= o["hfu_sim"] <= 1.0 + 1e-9
        assert 0 < o["mfu_machine"] <= o["hfu_machine"]
