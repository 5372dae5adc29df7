"""The mHC paper's MoE models (Table 5; `../reference` §3.13) and a small MoE model for CPU.

  paper_3b / paper_9b / paper_27b   Table 5 exactly: DeepSeek-V3-style MoE (1 leading dense layer,
                                    2 shared + 64/64/72 routed experts, 6 active), MLA (KV rank 512,
                                    RoPE 64 / theta 10000, 128-dim heads), mHC n = 4 (Sinkhorn 20,
                                    alpha init 0.01), RMSNorm eps 1e-20, sequence 4096, vocab 129280,
                                    AdamW (0.9, 0.95) eps 1e-20, weight decay 0.1, 2000 warmup steps,
                                    the paper's step schedule (x0.316 at 0.8, x0.1 at 0.9 of the steps)
  paper_3b_1t                       the 3B model on 1.05T tokens (batch 2560, 100k steps, lr 9e-4)
  moe_small                         the same architecture scaled down to train on the built-in
                                    corpus on CPU (16 routed experts, 2 active, 1 shared, MLA)

What Table 5 does not give, and the values here (each chosen so that the parameter totals come out;
`tests/moe/test_presets.py` checks total and active parameters within 2% of the table):
  - the leading dense layer's FFN width: `(n_shared + top_k) · d_expert` (the MoE layers' active
    width; `ModelConfig.ff_dim`);
  - queries: one full projection (`mla.q_rank = 0`); untied embedding and head;
  - "active parameters" count the parameters a token's forward pass multiplies by: every weight
    except the embedding table (a lookup) and the routed experts it was not sent to.
"""
from __future__ import annotations

from mhc_jax.config import (ConnectionConfig, DataConfig, MeshConfig, MLAConfig, ModelConfig,
                            MoEConfig, RunConfig, TrainConfig)

# Table 5 (attribute -> 3B, 9B, 27B)
TABLE5 = {
    "paper_3b": dict(layers=12, routed=64, d=1280, ffn=896, heads=16, batch=320, steps=30000,
                     lr=8.6e-4, total=2.97e9, active=612e6, vocab_params=331e6),
    "paper_9b": dict(layers=18, routed=64, d=1920, ffn=1280, heads=24, batch=512, steps=50000,
                     lr=5.9e-4, total=9.18e9, active=1.66e9, vocab_params=496e6),
    "paper_27b": dict(layers=30, routed=72, d=2560, ffn=1536, heads=32, batch=1280, steps=50000,
                      lr=4.0e-4, total=27.0e9, active=4.14e9, vocab_params=662e6),
    "paper_3b_1t": dict(layers=12, routed=64, d=1280, ffn=896, heads=16, batch=2560, steps=100000,
                        lr=9.0e-4, total=2.97e9, active=612e6, vocab_params=331e6),
}


def _paper(name: str) -> RunConfig:
  t = TABLE5[name]
  conn = ConnectionConfig(kind="mhc", n_streams=4, sinkhorn_iters=20, gate_init=0.01,
                          norm_eps=1e-20)
  model = ModelConfig(
      vocab_size=129280, d_model=t["d"], n_layers=t["layers"], n_heads=t["heads"], max_seq_len=4096,
      rope_theta=10000.0, norm_eps=1e-20, tie_embeddings=False, dtype="auto", scan_layers=True,
      remat="mhc_paper", connection=conn,
      mla=MLAConfig(kv_rank=512, q_rank=0, rope_dim=64, nope_dim=128, v_dim=128),
      moe=MoEConfig(n_routed=t["routed"], n_shared=2, top_k=6, d_expert=t["ffn"]),
      n_dense_layers=1)
  data = DataConfig(source="stdlib", seq_len=4096, batch_size=t["batch"])
  train = TrainConfig(steps=t["steps"], lr=t["lr"], schedule="paper_step", warmup_steps=2000,
                      b1=0.9, b2=0.95, adam_eps=1e-20, weight_decay=0.1, eval_every=1000,
                      checkpoint_every=1000, log_every=10, sample_tokens=0)
  return RunConfig(model=model, data=data, train=train, mesh=MeshConfig(strategy="fsdp"))


def paper_3b() -> RunConfig:
  return _paper("paper_3b")


def paper_9b() -> RunConfig:
  return _paper("paper_9b")


def paper_27b() -> RunConfig:
  return _paper("paper_27b")


def paper_3b_1t() -> RunConfig:
  return _paper("paper_3b_1t")


def moe_small() -> RunConfig:
  """The paper's architecture at CPU scale: d_model 128, 4 layers (1 dense), 16 routed experts of
  width 64 (2 active) + 1 shared, MLA (KV rank 32, RoPE 16, 32-dim heads), mHC n = 4; 300 steps of
  16 x 128 tokens of the built-in corpus."""
  model = ModelConfig(
      vocab_size=256, d_model=128, n_layers=4, n_heads=4, max_seq_len=256, dtype="auto",
      connection=ConnectionConfig(kind="mhc", n_streams=4),
      mla=MLAConfig(kv_rank=32, q_rank=0, rope_dim=16, nope_dim=32, v_dim=32),
      moe=MoEConfig(n_routed=16, n_shared=1, top_k=2, d_expert=64), n_dense_layers=1)
  data = DataConfig(source="stdlib", seq_len=128, batch_size=16)
  train = TrainConfig(steps=300, lr=3e-3, schedule="cosine", warmup_steps=30, weight_decay=0.1,
                      eval_every=150, eval_batches=8, log_every=10, checkpoint_every=150, keep=2,
                      sample_tokens=200)
  return RunConfig(model=model, data=data, train=train, mesh=MeshConfig(strategy="dp"))


PRESETS = {"paper_3b": paper_3b, "paper_9b": paper_9b, "paper_27b": paper_27b,
           "paper_3b_1t": paper_3b_1t, "moe_small": moe_small}

