"""Training settings of the neural families, typed: the `training:` block of a model in the
config is validated against one of these before any stage runs.

Pydantic's lax mode turns the strings PyYAML makes of some numbers (`lr: 3e-3` is read as the
string "3e-3") into the numbers the user meant; anything that is not a number is an error
naming the model and the field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from seqmodels.settings import Settings


class DistributedSettings(Settings):
    """How many processes the pipeline's train task launches (torch's elastic launcher): one
    per GPU, or per CPU share with gloo. The same model on 1 or 8 GPUs is the same model: these
    settings are in neither its folder name, its resume key nor any cache key."""

    nproc_per_node: int = Field(default=1, ge=1)  # processes (GPUs) per node
    nnodes: int = Field(default=1, ge=1)  # > 1: the other nodes run `python -m tasks.launch join`
    rdzv_endpoint: str | None = None  # host:port of node 0, where the ranks meet (nnodes > 1)
    max_restarts: int = Field(default=0, ge=0)  # relaunches of all workers after a failure

    @model_validator(mode="after")
    def _endpoint_for_several_nodes(self) -> DistributedSettings:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(
                f"nnodes: {self.nnodes} needs rdzv_endpoint (host:port of node 0, which every "
                "node can reach)"
            )
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"rdzv_endpoint {self.rdzv_endpoint!r} is not host:port")
        return self


class NoTraining(Settings):
    """Families that are counted, not trained by steps (the n-gram model): no settings."""

    # Accepted here only so that the config check can say why it does not apply.
    distributed: DistributedSettings | None = None


class TrainSettings(Settings):
    max_steps: int = Field(default=2000, gt=0)  # optimizer steps
    # LM: batch = batch_tokens // block_size windows; seq2seq: padded tokens per batch.
    batch_tokens: int = Field(default=4096, gt=0)
    lr: float = Field(default=1e-3, gt=0)  # peak learning rate, reached after warmup
    warmup_steps: int = Field(default=200, ge=0)
    schedule: Literal["inverse_sqrt", "cosine"] = "inverse_sqrt"
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)  # cosine: decays to lr * this
    # AdamW. beta2 0.98 (Vaswani et al.) rather than torch's 0.999: steadier with warmup.
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)  # matrices and embeddings only
    clip_norm: float = Field(default=1.0, gt=0)
    eval_every: int = Field(default=500, gt=0)
    log_every: int = Field(default=50, gt=0)
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when there is one
    valid_max_tokens: int | None = Field(default=None, gt=0)  # cap on validation tokens
    max_train_minutes: float | None = Field(default=None, gt=0)  # wall-clock safety net
    # A step sums the gradients of grad_accum_steps batches (the global batch under DDP),
    # normalised by their total token count: one big batch of grad_accum_steps * batch_tokens.
    grad_accum_steps: int = Field(default=1, ge=1)
    checkpoint_every: int | None = Field(default=None, ge=0)  # None: at every validation
    keep_last: int = Field(default=2, ge=0)  # newest checkpoints kept (>= 1 in practice)
    keep_best: int = Field(default=1, ge=0)  # best checkpoints kept by validation metric
    resume: bool = True  # continue from out_dir/checkpoints when config and data match
    early_stop_patience: int | None = Field(default=None, gt=0)  # validations without gain
    average_last_n: int = Field(default=1, ge=1)  # > 1: model.pt = mean of the last n
    compile: bool = False  # torch.compile the model (CUDA mostly; slow to start)
    # Where the pipeline starts this model on a new corpus version: "scratch" (max_steps from
    # random weights), or "champion": the experiment's registered champion (when it is a
    # version of this model) with its vocabulary, for continue_steps steps (None: max_steps)
    # on the files new since the champion's corpus version plus replay_fraction of the older
    # train rows (a stable hash of each row's file and line decides; 0: new files only). With
    # no such champion yet, the model trains from scratch as configured.
    train_from: Literal["scratch", "champion"] = "scratch"
    continue_steps: int | None = Field(default=None, gt=0)
    replay_fraction: float = Field(default=0.0, ge=0, le=1)
    # None: the train task trains in its own process; set: it launches worker processes.
    distributed: DistributedSettings | None = None

    @model_validator(mode="after")
    def _betas_in_range(self) -> TrainSettings:
        if not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be in [0, 1), got {list(self.adam_betas)}")
        return self


class LMTrainSettings(TrainSettings):
    # Context length of the training windows; None: the model's own (Transformer) or 128.
    block_size: int | None = Field(default=None, gt=0)


class Seq2SeqTrainSettings(TrainSettings):
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)  # validation is unsmoothed
    max_seq_len: int = Field(default=200, gt=0)  # longer training pairs are skipped
    # Sources longer than this many tokens are cut, not skipped (a summarisation source: an
    # email body), in training and, with the same limit, when the model decodes; counted.
    max_source_tokens: int | None = Field(default=None, gt=0)


# Fields that change neither the weights' trajectory nor the data, so a run may resume after
# changing them (e.g. raising max_train_minutes or the patience).
RESUME_FREE_FIELDS = frozenset(
    {
        "log_every",
        "device",
        "max_train_minutes",
        "checkpoint_every",
        "keep_last",
        "keep_best",
        "resume",
        "early_stop_patience",
        "average_last_n",
        "compile",
        # Read by the pipeline (where training starts, which steps and rows it gets: those
        # are in the key as max_steps and data), never by the trainer.
        "train_from",
        "continue_steps",
        "replay_fraction",
        # How many processes share a global batch does not change the trajectory (every rank
        # draws the same global batch and keeps its slice), so 1 or 8 GPUs resume each other.
        "distributed",
    }
)
