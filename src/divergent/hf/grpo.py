"""divergent's RL regularisers inside TRL: :class:`GRPOConfig` and :class:`GRPOTrainer`.

``GRPOTrainer`` is ``trl.GRPOTrainer`` — its generation (vLLM included), reward functions,
datasets, logging and distributed setup are TRL's — with one hook overridden: the loss of a
micro-batch (``_compute_loss``) becomes TRL's policy loss plus a regulariser from
:mod:`divergent.rl.registry`::

    loss = TRL's loss (with beta = 0) + coefficient(step) * value / gradient_accumulation_steps

``value`` is the registry's function (``divergent rl`` runs the same one): a token mean over
the micro-batch's completion tokens of

- ``reverse_kl``: k1/k2/k3 of log pi_theta - log pi_ref on the sampled tokens, with pi_ref a
  frozen copy of the initial policy; with TRL's ``use_bias_correction_kl`` (its default) each
  token's estimate is weighted by the importance ratio pi_theta/pi_old, as TRL's own KL is;
- ``dph``: f(pi_theta/pi_0) over a minibatch of the rehearsal set — responses sampled from
  the initial policy on ``dph_probe_prompts`` training prompts (``dph_probe_samples`` each, with
  TRL's temperature and max_completion_length) of the prompts it solves (reward > 0 on at
  least ``dph_solved_fraction`` of the samples), stored with their log pi_0;
- ``kdrl``: reverse KL to ``teacher_model`` on the policy's own completions, annealed, the
  correct ones (reward > 0) masked.

A token mean over the micro-batch is TRL's ``loss_type="bnpo"`` aggregation, so with it
``reverse_kl``/``k3``/``coefficient=beta`` gives exactly TRL's ``beta`` KL term (tested
against TRL). The value is logged through TRL's metrics under its name (``kl_k3``,
``dph/js``, ``kdrl``; KDRL's coefficient as ``kdrl_beta``).

The anchors' options map onto TRL's where TRL has them: the importance-sampling-corrected KL
is TRL's ``use_bias_correction_kl``; advantages divided by the sample std (Bessel-corrected)
are TRL's ``scale_rewards="group"``, and ``advantage_std="population"`` divides by the
population std instead (recomputed with :func:`divergent.rl.group_advantages`); verl's
dual-clip bound ``clip_ratio_c`` equals TRL's two-sided clipping ``delta`` (for A < 0 both cap
the per-token loss at -c·A; for A > 0 both leave PPO's clip unchanged), so ``dual_clip=c``
sets ``delta=c``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trl

from divergent.hf.resume import ExactResume
from divergent.rl import estimators, get_regulariser, group_advantages, masked_token_mean
from divergent.rl.registry import RegulariserInputs

__all__ = ["GRPOConfig", "GRPOTrainer"]


@dataclass
class GRPOConfig(trl.GRPOConfig):
    """``trl.GRPOConfig`` with a divergent regulariser; every TRL field keeps its meaning.

    regulariser: a name of :func:`divergent.rl.available_regularisers` ("none", "reverse_kl",
        "dph", "kdrl", or one registered by the user). TRL's own ``beta`` must stay 0 when it is
        not "none" (both would add a KL).
    regulariser_params: the regulariser's parameters by their registry names, e.g.
        ``{"kl_log_ratio_clamp": 20}``, ``{"dph_alpha": 0.3}``, the rehearsal settings
        ``{"dph_probe_prompts": 256, "dph_probe_samples": 8, "dph_solved_fraction": 0.5,
        "dph_batch_size": 32}``, or ``{"kdrl_estimator": "k3"}``.
    kl_estimator: k1, k2 or k3 (reverse_kl's estimator; default the registry's, k3).
    dph_divergence: DPH's generator f (forward_kl, js, alpha, ...; default the registry's).
    coefficient: a constant weight of the regulariser in place of its own (kl_beta, dph_eta, or
        KDRL's annealed schedule); None = the regulariser's.
    advantage_std: "sample" (TRL's, Bessel-corrected) or "population" (divide by G); only with
        scale_rewards="group".
    dual_clip: verl's clip_ratio_c (> 1 + epsilon): for negative advantages the per-token loss
        is at most -c·A; sets TRL's ``delta`` (which is the same bound).
    """

    regulariser: str = field(default="none", metadata={"help": "divergent RL regulariser (divergent.rl registry)."})
    regulariser_params: dict[str, Any] | None = field(default=None, metadata={"help": "The regulariser's parameters."})
    kl_estimator: str | None = field(default=None, metadata={"help": "reverse_kl's estimator: k1, k2 or k3."})
    dph_divergence: str | None = field(default=None, metadata={"help": "DPH's generator f."})
    coefficient: float | None = field(default=None, metadata={"help": "Constant weight of the regulariser."})
    advantage_std: str = field(default="sample", metadata={"help": "sample (TRL) or population std of a group."})
    dual_clip: float | None = field(default=None, metadata={"help": "verl's clip_ratio_c; sets TRL's delta."})

    def __post_init__(self) -> None:
        super().__post_init__()
        spec = get_regulariser(self.regulariser)
        params = dict(self.regulariser_params or {})
        names = [p.name for p in spec.params]
        for key in ("kl_estimator", "dph_divergence"):
            value = getattr(self, key)
            if value is None:
                continue
            if key not in names:
                raise ValueError(f"GRPOConfig.{key}={value!r} does not apply to regulariser {self.regulariser!r} "
                                 f"(its parameters: {names or 'none'})")
            if key in params and params[key] != value:
                raise ValueError(f"GRPOConfig.{key}={value!r} and regulariser_params[{key!r}]={params[key]!r} differ")
            params[key] = value
        self.resolved_params = spec.resolve(params, prefix="GRPOConfig.regulariser_params.")
        if self.regulariser != "none" and self.beta != 0.0:
            raise ValueError(f"GRPOConfig.beta={self.beta} adds TRL's own KL on top of regulariser "
                             f"{self.regulariser!r}; set beta=0 (use regulariser='reverse_kl' with coefficient)")
        if self.coefficient is not None and (isinstance(self.coefficient, bool) or not self.coefficient >= 0):
            raise ValueError(f"GRPOConfig.coefficient must be a number >= 0 or None, got {self.coefficient!r}")
        if self.advantage_std not in ("sample", "population"):
            raise ValueError(f"GRPOConfig.advantage_std must be 'sample' (TRL's) or 'population', "
                             f"got {self.advantage_std!r}")
        if self.advantage_std == "population" and (self.scale_rewards != "group"
                                                   or self.multi_objective_aggregation != "sum_then_normalize"):
            raise ValueError("GRPOConfig.advantage_std='population' needs scale_rewards='group' and "
                             f"multi_objective_aggregation='sum_then_normalize', got {self.scale_rewards!r} and "
                             f"{self.multi_objective_aggregation!r}")
        if self.dual_clip is not None:
            upper = 1.0 + (self.epsilon_high if self.epsilon_high is not None else self.epsilon)
            if isinstance(self.dual_clip, bool) or not self.dual_clip > upper:
                raise ValueError(f"GRPOConfig.dual_clip must be > 1 + epsilon_high = {upper:g} (verl's "
                                 f"clip_ratio_c, 3 there), got {self.dual_clip!r}")
            if self.delta is not None and self.delta != self.dual_clip:
                raise ValueError(f"GRPOConfig.dual_clip={self.dual_clip} and delta={self.delta} are the same bound; "
                                 f"give one")
            self.delta = self.dual_clip
        if self.regulariser == "kdrl" and self.resolved_params.get("kdrl_estimator") == "full":
            raise ValueError("GRPOConfig.regulariser_params.kdrl_estimator='full' needs [B, T, V] logits, which "
                             "TRL's fused log-prob forward does not produce; use k1, k2 or k3")


def _metric_name(regulariser: str, params: dict[str, Any]) -> str:
    if regulariser == "reverse_kl":
        return f"kl_{params['kl_estimator']}"
    if regulariser == "dph":
        return f"dph/{params['dph_divergence']}"
    return regulariser


class GRPOTrainer(ExactResume, trl.GRPOTrainer):
    """``trl.GRPOTrainer`` with :class:`GRPOConfig`'s regulariser (see the module docstring).

    ``teacher_model``: the KDRL teacher, a model or a local ``save_pretrained`` folder; it must
    share the policy's tokenizer (a folder's tokenizer is compared with ``processing_class``).
    Other arguments are TRL's.
    """

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, *, teacher_model=None, **kwargs) -> None:
        if not isinstance(args, GRPOConfig):
            raise TypeError(f"args must be a divergent.hf.GRPOConfig (a trl.GRPOConfig with the regulariser's "
                            f"fields), got {type(args).__name__}")
        self._spec = get_regulariser(args.regulariser)
        if "teacher" in self._spec.needs and teacher_model is None:
            raise ValueError(f"regulariser {args.regulariser!r} needs teacher_model= (a model or a local folder)")
        if teacher_model is not None and "teacher" not in self._spec.needs:
            raise ValueError(f"teacher_model is given but regulariser {args.regulariser!r} does not use a teacher")
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self._params = args.resolved_params
        self._metric = _metric_name(args.regulariser, self._params)
        self._capturing, self._captured = False, None
        self._reference = self._teacher = self._rehearsal = None
        if "reference" in self._spec.needs:
            reference = copy.deepcopy(self.accelerator.unwrap_model(self.model)).eval().requires_grad_(False)
            self._reference = self.accelerator.prepare_model(reference, evaluation_mode=True)
        if teacher_model is not None:
            teacher = self._load_teacher(teacher_model)
            # Log-probs as TRL computes the policy's: chunked, at the sampling temperature.
            trl.trainer.add_fused_lm_head(teacher, temperature=self.temperature,
                                          cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
            self._teacher = self.accelerator.prepare_model(teacher.eval().requires_grad_(False), evaluation_mode=True)

    def _load_teacher(self, teacher_model):
        from divergent.models.hf import check_same_tokenizer, load_causal_lm, load_tokenizer

        if isinstance(teacher_model, (str, Path)):
            teacher = load_causal_lm(teacher_model, what="teacher_model")
            tokenizer = load_tokenizer(teacher_model, "teacher_model")
            if tokenizer is None:
                raise ValueError(f"teacher_model {teacher_model} has no tokenizer saved beside it; KDRL compares "
                                 f"token ids, so save the tokenizer there (tokenizer.save_pretrained)")
            try:
                check_same_tokenizer(self.processing_class, tokenizer)
            except ValueError as exc:
                raise ValueError(f"teacher_model {teacher_model}: {exc}") from None
            return teacher
        policy_vocab = self.accelerator.unwrap_model(self.model).get_output_embeddings().weight.shape[0]
        teacher_vocab = teacher_model.get_output_embeddings().weight.shape[0]
        if policy_vocab != teacher_vocab:
            raise ValueError(f"teacher_model has {teacher_vocab} output rows and the policy {policy_vocab}: they do "
                             f"not share one tokenizer (KDRL compares token ids)")
        return teacher_model

    # -- advantages with the population std -------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        # The whole generation batch's rewards (gathered over processes), this process's slice.
        weights = self.reward_weights.to(self._last_rewards_per_func.device)
        rewards = (self._last_rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        n = output["advantages"].shape[0]
        local = slice(self.accelerator.process_index * n, (self.accelerator.process_index + 1) * n)
        output["divergent_rewards"] = rewards[local].to(output["advantages"].device)
        if self.args.advantage_std == "population":
            mode = "train" if self.model.training else "eval"
            group = self.num_generations if mode == "train" else self.num_generations_eval
            advantages = group_advantages(rewards.view(-1, group), std="population").reshape(-1)
            output["advantages"] = advantages[local].to(output["advantages"].device)
        return output

    # -- the loss ------------------------------------------------------------------------------

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        result = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        if self._capturing and self._captured is None:  # the policy's forward inside _compute_loss
            self._captured = result[0]
        return result

    def _compute_loss(self, model, inputs):
        self._capturing, self._captured = True, None
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._capturing = False
        if self._spec.name == "none":
            return loss
        logp, self._captured = self._captured, None
        mask = inputs["completion_mask"].bool()
        if "tool_mask" in inputs:
            mask = mask & inputs["tool_mask"].bool()
        step = self.state.global_step
        value = self._regulariser_value(model, inputs, logp, mask, step)
        weight = self.args.coefficient if self.args.coefficient is not None else \
            self._spec.coefficient(step, **self._params)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][self._metric].append(self.accelerator.gather(value.detach()).nanmean().item())
        if self._spec.log_coefficient_as:
            self._metrics[mode][self._spec.log_coefficient_as].append(float(weight))
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        return loss + weight * value / accumulation

    def _forward_logps(self, model, inputs, prompt_ids=None, prompt_mask=None, completion_ids=None,
                       completion_mask=None) -> torch.Tensor:
        prompt_ids = inputs["prompt_ids"] if prompt_ids is None else prompt_ids
        prompt_mask = inputs["prompt_mask"] if prompt_mask is None else prompt_mask
        completion_ids = inputs["completion_ids"] if completion_ids is None else completion_ids
        completion_mask = inputs["completion_mask"] if completion_mask is None else completion_mask
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, completion_ids.size(1))[0]

    def _regulariser_value(self, model, inputs, logp, mask, step) -> torch.Tensor:
        fields: dict[str, Any] = {}
        if "reference" in self._spec.needs:
            with torch.no_grad():
                fields["ref_logp"] = self._forward_logps(self._reference, inputs)
        if "teacher" in self._spec.needs:
            with torch.no_grad():
                fields["teacher_logp"] = self._forward_logps(self._teacher, inputs)
        if "rehearsal" in self._spec.needs:
            fields.update(self._rehearsal_fields(model, step))
        regulariser_inputs = RegulariserInputs(logp=logp, logits=None, mask=mask, rewards=inputs["divergent_rewards"],
                                               step=step, **fields)
        if self._spec.name == "reverse_kl" and self.args.use_bias_correction_kl:
            # TRL's importance-sampling-corrected KL: each token's estimate times pi_theta / pi_old.
            old = inputs.get("old_per_token_logps")
            log_ratio = logp - (logp.detach() if old is None else old)
            if self.importance_sampling_level == "sequence":
                log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
            per_token = estimators.kl_estimator(logp, fields["ref_logp"], self._params["kl_estimator"],
                                                log_ratio_clamp=self._params["kl_log_ratio_clamp"],
                                                value_clamp=self._params["kl_value_clamp"])
            return masked_token_mean(per_token * torch.exp(log_ratio), mask)
        return self._spec.value(regulariser_inputs, **self._params)

    # -- DPH's rehearsal set ---------------------------------------------------------------------

    def _process_state(self) -> dict:  # the rehearsal set travels with checkpoints (ExactResume)
        state = super()._process_state()
        if self._rehearsal is not None:
            state["dph_rehearsal"] = self._rehearsal
        return state

    def _restore_process_state(self, state: dict, checkpoint: str) -> None:
        super()._restore_process_state(state, checkpoint)
        if "dph_rehearsal" in state:
            self._rehearsal = state["dph_rehearsal"]
        elif "rehearsal" in self._spec.needs and self.state.global_step > 0:
            raise ValueError(f"checkpoint {checkpoint} has no DPH rehearsal set in "
                             f"{os.path.basename(self._process_file(checkpoint))}: resuming would sample it from "
                             f"the checkpoint's policy, not the initial one; resume from a checkpoint this "
                             f"trainer wrote")

    def _rehearsal_fields(self, model, step: int) -> dict[str, torch.Tensor | None]:
        if self._rehearsal is None:
            self._rehearsal = self._build_rehearsal()
        rehearsal = self._rehearsal
        n = rehearsal["completion_ids"].shape[0]
        if n == 0:
            return {}
        generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + step)
        rows = torch.randperm(n, generator=generator)[: self._params["dph_batch_size"]]
        device = self.accelerator.device
        picked = {k: v[rows].to(device) for k, v in rehearsal.items()}
        logp = self._forward_logps(model, None, picked["prompt_ids"], picked["prompt_mask"],
                                   picked["completion_ids"], picked["completion_mask"])
        return {"rehearsal_logp": logp, "rehearsal_logp0": picked["logp0"],
                "rehearsal_mask": picked["completion_mask"].bool()}

    @torch.no_grad()
    def _build_rehearsal(self) -> dict[str, torch.Tensor]:
        """Sample the initial policy on training prompts; keep the responses of the prompts it solves."""
        from trl.data_utils import is_conversational

        params, args = self._params, self.args
        dataset = self.train_dataset
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
        rows = [dataset[int(i)] for i in order[: params["dph_probe_prompts"]]]
        samples = params["dph_probe_samples"]
        policy = self.accelerator.unwrap_model(self.model)
        tokenizer = self.processing_class
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kept: list[tuple[list[int], list[int]]] = []
        was_training = policy.training
        policy.eval()
        for row in rows:
            (prompt_ids,), _, _ = self._tokenize_prompts([row["prompt"]])
            prompt = torch.tensor([list(prompt_ids)], device=self.accelerator.device)
            generated = policy.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                        temperature=args.temperature, max_new_tokens=args.max_completion_length,
                                        num_return_sequences=samples, pad_token_id=pad)
            completions_ids = []
            for sequence in generated[:, prompt.shape[1]:].tolist():
                if tokenizer.eos_token_id in sequence:
                    sequence = sequence[: sequence.index(tokenizer.eos_token_id) + 1]
                completions_ids.append(sequence)
            texts = tokenizer.batch_decode(completions_ids, skip_special_tokens=True)
            completions = [[{"role": "assistant", "content": t}] for t in texts] \
                if is_conversational({"prompt": row["prompt"]}) else texts
            rewards_per_func = self._calculate_rewards([row] * samples, [row["prompt"]] * samples, completions,
                                                       completions_ids)
            rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
            correct = rewards > 0
            if float(correct.float().mean()) >= params["dph_solved_fraction"]:
                kept += [(list(prompt_ids), c) for c, ok in zip(completions_ids, correct.tolist()) if ok and c]
        policy.train(was_training)
        return self._pad_rehearsal(kept, pad)

    def _pad_rehearsal(self, kept: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
        if not kept:
            empty = torch.zeros((0, 1), dtype=torch.long)
            return {"prompt_ids": empty, "prompt_mask": empty, "completion_ids": empty, "completion_mask": empty,
                    "logp0": torch.zeros((0, 1))}
        width_p, width_c = max(len(p) for p, _ in kept), max(len(c) for _, c in kept)
        # Prompts left-padded (as TRL pads them), completions right-padded.
        prompt_ids = torch.tensor([[pad] * (width_p - len(p)) + p for p, _ in kept])
        prompt_mask = torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) for p, _ in kept])
        completion_ids = torch.tensor([c + [pad] * (width_c - len(c)) for _, c in kept])
        completion_mask = torch.tensor([[1] * len(c) + [0] * (width_c - len(c)) for _, c in kept])
        device = self.accelerator.device
        logp0 = self._forward_logps(self.model, None, prompt_ids.to(device), prompt_mask.to(device),
                                    completion_ids.to(device), completion_mask.to(device)).cpu()
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
                "completion_mask": completion_mask, "logp0": logp0}

