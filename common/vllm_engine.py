"""Rollouts sampled by vLLM (--vllm), colocated in each training process: the algorithm is unchanged.

At real sizes sampling the responses is most of an RLHF update, and vLLM samples them several
times faster than transformers' generate (paged KV cache, continuous batching, CUDA graphs). The
engine is built once from --model in the training process itself (VLLM_ENABLE_V1_MULTIPROCESSING=0;
under `accelerate launch`, one engine per process with the "external_launcher" executor, as TRL's
colocate mode does) and only samples: it is given token ids (never re-tokenised text), the
sampling settings of generate (temperature, no top-k, top-p 1, max new tokens, the tokenizer's EOS
and nothing else), and before every rollout the policy's current weights (LoRA: merged). The
scripts still recompute the log-probs with the training forward (ratio exactly 1) and cut the
responses at the first EOS. What vLLM reports for its samples is kept for one check,
val/rollout_logprob_diff: the mean |log-prob vLLM sampled with - recomputed log-prob| over the
response tokens. Near 0 (kernel and precision differences) when the engine holds the policy's
weights; it grows when it does not (stale weights are the classic silent failure of this design).

vllm is optional (pip install -e ".[vllm]", its own environment: see the README) and imported
only with --vllm. Sampling draws from the process's global RNGs (torch on CPU; numpy for each
request's seed in vLLM's GPU runner), which the script seeds per process and checkpoints save, so
a run is reproducible; vLLM's kernels differ from transformers', so its
samples are not those of generate.
"""

import os

import torch
from accelerate.utils import DistributedType

from common.models import adapter_base, max_positions
from common.ops import global_means


def import_vllm():
    """The vllm module, or an ImportError that says how to install it."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives in this process, on its seeded RNGs
    try:
        import vllm
    except ImportError as e:
        raise ImportError('--vllm needs vLLM: pip install -e ".[vllm]" (see the README\'s "Fast rollouts")') from e
    return vllm


def check_vllm_args(args, accelerator) -> None:
    """Before anything is loaded: vLLM installed, and a setting it supports."""
    if not getattr(args, "vllm", False):
        if getattr(args, "vllm_gpu_memory_utilization", 0.3) != 0.3:
            raise ValueError("--vllm-gpu-memory-utilization without --vllm: it only applies to --vllm")
        return
    if not 0 < args.vllm_gpu_memory_utilization <= 1:
        raise ValueError(f"--vllm-gpu-memory-utilization {args.vllm_gpu_memory_utilization}: must be in (0, 1]")
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("--vllm is not supported under FSDP (it is under DDP and DeepSpeed): drop one of them")
    import_vllm()


class VLLMEngine:
    """A vLLM engine that samples responses for the trained policy. load_weights(policy) before each
    rollout; generate() in place of common.rollout.generate; logprob_diff() for the check above."""

    def __init__(self, args, accelerator):
        vllm = import_vllm()
        distributed = dict(distributed_executor_backend="external_launcher") if accelerator.num_processes > 1 else {}
        max_len = args.max_prompt_length + args.max_new_tokens  # the KV cache need not hold more per sequence
        max_len = min(max_len, max_positions(args.model, args.trust_remote_code) or max_len)
        self.llm = vllm.LLM(
            adapter_base(args.model) or args.model,  # an SFT adapter: its base; load_weights brings the merged policy
            dtype="bfloat16" if args.bf16 else "float32",
            seed=args.seed + accelerator.process_index,  # replaced by the script's per-process seed, set after this
            skip_tokenizer_init=True,  # token ids in and out: nothing is re-tokenised
            generation_config="vllm",  # ignore the model's generation_config.json (its EOS list, top-k, ...)
            logprobs_mode="processed_logprobs",  # log-probs after the temperature: what the scripts recompute
            max_model_len=max_len,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
            enable_prefix_caching=True,
            trust_remote_code=args.trust_remote_code,
            **distributed,
        )
        self.sampling_params = vllm.SamplingParams
        self.logprobs = None  # (B, T): vLLM's log-probs of the last sampled responses
        OPEN.append(self)

    def close(self) -> None:
        """Shut the engine down (its distributed groups too) while torch.distributed is still up."""
        self.llm.llm_engine.engine_core.shutdown()

    @torch.no_grad()
    def load_weights(self, policy: torch.nn.Module) -> None:
        """The policy's current weights into the engine (a PeftModel's adapters merged in), and the
        prefix cache emptied: its keys and values were computed with the old weights. Call with the
        unwrapped policy; under ZeRO-3 inside unwrap_for_generation, where the weights are gathered."""
        from transformers.core_model_loading import revert_weight_conversion

        state_dict = policy.state_dict()
        if hasattr(policy, "disable_adapter"):  # LoRA
            from common.lora import merged_state_dict

            state_dict, policy = merged_state_dict(policy, state_dict), policy.get_base_model()
        # transformers 5 renames or fuses some architectures' weights when loading (MoE experts, ...): back to the
        # checkpoint's names, as save_pretrained writes them, which are what vLLM's loader reads
        state_dict = revert_weight_conversion(policy, state_dict)
        # the worker's reload_weights: weights in checkpoint (transformers) names, re-processed as at load time
        self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=iter(state_dict.items())))
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def generate(self, queries: torch.Tensor, query_mask: torch.Tensor, config) -> torch.Tensor:
        """Responses (B, T) to left-padded queries (B, P) under a transformers GenerationConfig (sampled
        or greedy), padded with its pad id after the EOS as generate() does; T <= max_new_tokens. A sampled
        batch also keeps vLLM's log-probs of its tokens in self.logprobs (B, T)."""
        greedy = not config.do_sample
        params = self.sampling_params(
            n=1,
            temperature=0.0 if greedy else config.temperature,
            top_k=0,  # off
            top_p=1.0,
            min_tokens=0,
            max_tokens=config.max_new_tokens,
            stop_token_ids=[config.eos_token_id],  # the only stop: no other id, no stop strings
            logprobs=None if greedy else 0,  # the sampled token's log-prob only
            detokenize=False,
        )
        prompts = [{"prompt_token_ids": q[m].tolist()} for q, m in zip(queries, query_mask.bool())]
        outputs = [o.outputs[0] for o in self.llm.generate(prompts, params, use_tqdm=False)]
        T = max(len(o.token_ids) for o in outputs)
        responses = torch.full((len(outputs), T), config.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(len(outputs), T)
        for i, o in enumerate(outputs):
            n = len(o.token_ids)
            responses[i, :n] = torch.tensor(o.token_ids)
            if not greedy:
                logprobs[i, :n] = torch.tensor([lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)])
        if not greedy:
            self.logprobs = logprobs.to(queries.device)
        return responses.to(queries.device)

    def logprob_diff(self, accelerator, logprobs: torch.Tensor, response_mask: torch.Tensor) -> float:
        """Mean |vLLM's log-prob - recomputed log-prob| over the response tokens of all processes."""
        diff = (self.logprobs - logprobs).abs()[response_mask]
        return global_means(accelerator, {"diff": diff})["diff"]


def close_engines() -> None:
    """Shut down every engine of this process: Run.save calls it before accelerator.end_training(),
    which would otherwise tear down the process groups under the engines' own exit-time shutdown."""
    while OPEN:
        OPEN.pop().close()


OPEN = []  # the engines of this process
