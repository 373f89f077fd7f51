"""Training: one Trainer for every objective, one frame around it, and the entry points that use them.

`trainer` (the loop), `frame` (out_dir, resume, process group: what every run does around the
loop), `objectives` (what is trained; CausalLM, and the validation pass), and one module per
entry point: `pretrain`, `mlm`, `finetune` (+ `sft`), `classify`; `evaluate` scores finished
models; `report` and `metrics` are a run's records. Nothing is imported here: import from the
module that defines a name, so loading one of them does not load them all.

    from chatforge.train.pretrain import pretrain
    from chatforge.train.trainer import Trainer
"""
