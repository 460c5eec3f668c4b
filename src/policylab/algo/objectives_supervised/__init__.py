"""Classification, preference, routing and soft objectives (objectives.md §3, §4, §6).

Modules, one family each:
- ``classification``: REAL (§3.1), PACS (§3.2), NFT (§3.3)
- ``preference``:     TRPA (§3.5), CoPG (§3.6), KTO (§3.7), DPO (§3.8) and the online pair construction
- ``distillation``:   SDPO (§4.1) and SRPO (§4.2), with the self-distillation teacher they share
- ``sparse``:         ReasonMaxxer (§4.3)
- ``layback``:        PIPO (§4.4)
- ``soft_thinking``:  SofT-GRPO math (§6.1); Latent-GRPO (§6.2) and DePO (§6.3) stay outlines
- ``common``:         turning sequence-, pair- and batch-level losses into the per-token contract

PSR / NSR / W-REINFORCE (§3.4) are advantages on top of the baseline objectives:
``policylab.algo.advantages_signed``.
"""
