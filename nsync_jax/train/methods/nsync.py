"""NSYNC: each step's positive gradient refined against its caption-matched synthetic negative's (and a random
other positive's, the anchor) by `optim.orthogonal_projection`, first in the optax chain.

The step runs its positive, negative and anchor groups through the text encoder and UNet as one batch; each
group reads its own copy of what is trained, so one backward pass returns (g_p, g_n, g_a). Variants that do not
read the anchor's gradient (`orthogonal`, `released`, ...) do not run the anchor group. `optim`'s docstring
lists every variant: the paper's rules and each configuration of the released code (`released_v4.1`,
`released` = v4.2, `released_v5.0`, `released_v5.1`) as what it computes.
"""
from __future__ import annotations

import functools

import optax

from nsync_jax.errors import UserError
from nsync_jax.optim import ANCHOR_VARIANTS, GRANULARITIES, VARIANTS, orthogonal_projection
from nsync_jax.train import data as train_data
from nsync_jax.train.methods.base import Method
from nsync_jax.train.step import group_gradients


# The negatives' prompts: the positives' ("<caption> in the style of <token>", the paper's and the released
# default) or "<caption> not in the style of <token>" (the released v5.x configurations).
NEGATIVE_PROMPTS = ("in_style", "not_in_style")


class NSYNC(Method):
    name = "nsync"
    contrastive = True
    supports_sdxl = True

    def check_config(self, config):
        if config.nsync.variant not in VARIANTS:
            raise UserError(f"config nsync.variant={config.nsync.variant!r} must be one of {', '.join(VARIANTS)}")
        if config.nsync.granularity not in GRANULARITIES:
            raise UserError(f"config nsync.granularity={config.nsync.granularity!r} must be one of "
                            f"{', '.join(GRANULARITIES)}")
        if config.nsync.negative_prompt not in NEGATIVE_PROMPTS:
            raise UserError(f"config nsync.negative_prompt={config.nsync.negative_prompt!r} must be one of "
                            f"{', '.join(NEGATIVE_PROMPTS)}")
        if not (config.data.negatives or config.data.prepared):
            raise UserError("config data.negatives is required for method nsync")

    def prepare(self, pipe, dataset, config, workdir, progress):
        prepared = train_data.prepare(pipe, dataset, config, config.placeholder_token,
                                      negated_negatives=config.nsync.negative_prompt == "not_in_style")
        return train_data.TrainingData(functools.partial(self.batch, prepared, config), prepared.prompts)

    def read_data(self, config):
        return train_data.read_style_dataset(config, needs_negatives=self.name)

    def gradients(self, spec, config):
        groups = 3 if config.nsync.variant in ANCHOR_VARIANTS else 2
        return functools.partial(group_gradients, spec, groups, config.nsync.share_noise)

    def optimizer(self, config, adamw):
        return optax.chain(orthogonal_projection(config.nsync.variant, config.nsync.granularity), adamw)

    def metadata(self, config):
        return {"variant": config.nsync.variant}
