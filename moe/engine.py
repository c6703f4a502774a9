"""The engine: requests in, one step at a time, outputs out.

``step()`` reads as four stages: schedule, run, postprocess, collect the finished. Under a
launcher every rank runs this same engine in lock-step; that plumbing lives in moe/spmd.py.
"""
from __future__ import annotations

import itertools
import logging
import operator
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

import cpu_kernels
from kvcache import BlockManager, check_kv_cache_dtype

from .config import EngineConfig, ModelConfig, parse_bytes, read_config_json
from .drafter import DraftModel, DraftModelProposer, Drafter, MTPDrafter
from .loader import load_mtp, load_weights
from .model_runner import ModelRunner, StepResult
from .models import MoECausalLM, parse_config, rules_for
from .models.quant_weights import checkpoint_rules, plan_experts
from .outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from .sampler import Sampler
from .sampling_params import SamplingParams, generation_defaults
from .scheduler import ScheduledBatch, Scheduler
from .spec_cost import SpecCostModel
from .spec_decode import DraftCounts, NgramProposer, Proposer, SpecStats, SpeculativeConfig, shipped_mtp_head
from .sequence import Sequence
from .spmd import LockStep, init_parallel
from .structured_output import StructuredOutputManager
from .tokenizer import Tokenizer, detokenize_incrementally

log = logging.getLogger("moe")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(requested: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return _DTYPES[requested]
    dtype = _DTYPES.get(cfg.torch_dtype.replace("torch.", ""), torch.bfloat16)
    if dtype == torch.float16 and device.type == "cpu":
        return torch.bfloat16  # float16 matmuls are slow on CPUs; bfloat16 keeps the range
    return dtype


def _reuse_freed_memory() -> None:
    """Keep freed blocks below 32 MiB in glibc's heap for reuse (process-wide; set by every CPU engine).

    A CPU step allocates and frees activations of a few MiB per op (a 2048-token prefill chunk:
    4-23 MiB each). Above glibc's mmap threshold each is a fresh mapping, so every op first
    page-faults its output in (measured: ``pow`` over 2048 x 1024 floats 9.7 ms instead of 1.3 ms;
    prefill of the throughput benchmark 7.8 -> 5.8 s, peak RSS +1%). An engine with offloaded
    experts wants the opposite (freed expert blocks back to the OS, see experts/offload.py) and
    does not call this; whichever ran last decides.
    """
    cpu_kernels.set_malloc_thresholds(32 << 20, 1 << 30)  # glibc's largest mmap threshold; keep 1 GiB at the top


def _held_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The model's parameters and buffers, and the tensors its modules hold otherwise (compute layouts
    built at load, such as packed experts' CPU layouts and packed linear weights: in attributes, tuples
    or lists of them, or objects holding them, two levels down)."""
    out = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        todo = [(v, 0) for k, v in vars(module).items() if k not in ("_parameters", "_buffers", "_modules")]
        while todo:
            v, depth = todo.pop()
            if isinstance(v, torch.Tensor):
                out.append(v)
            elif depth < 3 and isinstance(v, (tuple, list)):
                todo += [(x, depth + 1) for x in v]
            elif depth < 3 and hasattr(v, "__dict__") and not isinstance(v, (torch.nn.Module, type)):
                todo += [(x, depth + 1) for x in vars(v).values()]
    return out


def _huge_pages(model: torch.nn.Module, collapse: bool = False) -> int:
    """Back a CPU model's weights with transparent huge pages (:func:`cpu_kernels.advise_huge_pages`):
    batch-1 decode streams every weight once a token, and on 4 KiB pages the stream meets a TLB miss
    and a stopped hardware prefetch every 4 KiB (batch-1 decode 1.04-1.18x on the benchmark shapes, one
    process, engines alternating; docs/benchmarks.md). With ``collapse`` (the weights loaded), the
    storages too small for a huge page of their own are first gathered into one arena
    (:func:`cpu_kernels.gather_small_storages`). Returns the bytes advised."""
    held = _held_tensors(model)
    if collapse:
        cpu_kernels.gather_small_storages(held)
    return cpu_kernels.advise_huge_pages(held, collapse)


class LLMEngine:
    QUIET_SAMPLE = 4  # cost control times one in this many quiet steps (plain decoding known to stand)

    def __init__(self, config: EngineConfig):
        self.config = config
        model_dir = Path(config.model)
        hf = read_config_json(model_dir)
        plan = plan_experts(hf, config.quantization, config.offload_experts, config.expert_cache)
        self.model_config = cfg = replace(parse_config(hf), experts=plan)
        self.parallel, device = init_parallel(config, cfg)
        self.device = torch.device(device)
        self.lockstep = LockStep(self.parallel, self.device)
        self.dtype = resolve_dtype(config.dtype, cfg, self.device)
        if self.device.type == "cpu" and not config.offload_experts:
            _reuse_freed_memory()
        self.kv_fp8 = check_kv_cache_dtype(config.kv_cache_dtype)
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        # what a request leaves unset, from the checkpoint's generation_config.json (vLLM's "auto")
        self.default_sampling_params = generation_defaults(model_dir, config.generation_config,
                                                           config.override_generation_config)
        if self.default_sampling_params:
            log.info("default sampling parameters from %s: %s (generation_config='vllm' turns them off)",
                     "the model's generation_config.json" if config.generation_config == "auto"
                     else config.generation_config, self.default_sampling_params)
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings "
                             f"({cfg.max_position_embeddings}); lower it")
        with torch.device(self.device):
            self.model = MoECausalLM(cfg, self.dtype)
        for moe in self.model.sparse_layers():
            moe.experts.backend = config.experts_backend
        huge = self.device.type == "cpu" and not config.offload_experts  # (offloaded: read from the file maps)
        if huge:
            _huge_pages(self.model)  # (before the weights are written: their pages then fault in huge)
        rules = checkpoint_rules(plan, rules_for(cfg.architecture), model_dir)  # + packed/fp8 layouts
        load_weights(self.model, model_dir, rules, cfg.num_layers, cfg.tie_word_embeddings,
                     progress=config.load_progress)
        self.model.eval()
        self.huge_page_bytes = _huge_pages(self.model, collapse=True) if huge else 0  # (and what loading built)
        self.tokenizer: Tokenizer | None = Tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None
        self.eos_ids = self._eos_ids(model_dir, cfg)

        self.spec = spec = SpeculativeConfig.parse(config.speculative_config)
        if spec is not None and self.parallel.dp_size > 1:
            raise ValueError("speculative_config with data_parallel > 1 is not supported yet: drop one of them")
        self.drafter = self._load_drafter(spec)
        if huge and self.drafter is not None:
            _huge_pages(self.drafter.model, collapse=True)
        self.kv_caches, num_blocks = self._allocate_kv_cache()
        # one block manager per data-parallel group: each group's caches hold only its own sequences
        self.block_managers = [BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
                               for _ in range(self.parallel.dp_size)]
        self.block_manager = self.block_managers[0]
        self.scheduler = Scheduler(self.block_managers, config.max_num_seqs, config.max_num_batched_tokens)
        if isinstance(self.drafter, DraftModel):  # it marks the cached blocks holding its K/V too
            self.drafter.block_manager_of = self.scheduler.block_manager_of
        self.sampler = Sampler(config.seed)
        self._spec_stats = SpecStats()
        self.spec_cost: SpecCostModel | None = None  # picks K per step (cost_control)
        self._quiet = [0, 0]  # (batch size, steps left) for which plain decoding stands (_choose_k)
        # while the quiet steps stand and drafting could not pay even with every draft accepted
        # (SpecCostModel.hopeless), the drafter is not kept up to date ("dormant"): a step then skips
        # its catch-up (``_skipped``), and the first step that asks again is a plain one it sees
        self._dormant = False
        self._skipped = False
        self._probing: list[str] = []  # the sources probing this step
        self.proposer: Proposer | None = None
        self._lookup: NgramProposer | None = None
        if spec is not None:
            self.proposer = self.scheduler.proposer = self._proposer(spec)
        self.runner = ModelRunner(self.model, self.kv_caches, config.block_size, self.sampler, self.device,
                                  self.drafter)
        self.runner.record_expert_counts = config.record_expert_counts
        # multi-step decoding: decode steps back to back in C, where the runner can
        # (with speculation, on the steps cost control keeps plain: _steps_allowed)
        self._max_steps = config.num_scheduler_steps \
            if self.runner.runs_steps and not config.record_expert_counts else 1
        self.scheduler.max_steps = self._max_steps if spec is None else 1
        self.scheduler.max_step_rows = self.runner.captured.max_rows if self._max_steps > 1 else 1
        self.seqs: dict[str, Sequence] = {}  # request id -> its sequence (sample 0 when n > 1)
        self.samples: dict[str, list[Sequence]] = {}  # request id -> its n sequences
        self._structured: StructuredOutputManager | None = None  # built by the first structured request
        self._structured_lock = threading.Lock()  # (built from the engine thread or a server's worker thread)
        self._ids = itertools.count()
        self.warmup_s = 0.0
        if config.warmup and self.device.type == "cpu":
            from .warmup import warm_up

            shapes, self.warmup_s = warm_up(self.model, config.max_num_batched_tokens, config.max_num_seqs)
            if isinstance(self.drafter, DraftModel):  # its steps bring its own shapes
                more, seconds = warm_up(self.drafter.model, config.max_num_batched_tokens, config.max_num_seqs)
                shapes, self.warmup_s = shapes + more, self.warmup_s + seconds
            log.info("warm-up: %d GEMM shapes in %.1f s", shapes, self.warmup_s)

    # ---- set-up -------------------------------------------------------------------------
    def _eos_ids(self, model_dir: Path, cfg: ModelConfig) -> tuple[int, ...]:
        import json

        ids = list(cfg.eos_token_ids)
        gen = model_dir / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return tuple(dict.fromkeys(ids))

    def _load_drafter(self, spec: SpeculativeConfig | None) -> Drafter | None:
        if spec is None or not spec.uses_drafter:
            return None
        if self.parallel.world_size > 1:
            raise ValueError(f"speculative_config method {spec.method!r} runs in one process only for now: "
                             "drop the sharding or use method 'ngram'")
        if spec.method == "mtp":
            path, cfg = self.config.model, self.model_config
            head = spec.model or shipped_mtp_head(self.config.model, cfg)
            if head is not None:  # an MTP-style head in a directory of its own (moe distill --student mtp)
                hf = read_config_json(head)
                path, cfg = head, replace(parse_config(hf), experts=plan_experts(hf))
            mtp = load_mtp(path, cfg, self.dtype, self.device, target=self.model)
            if mtp is None:
                raise ValueError(f"speculative_config method 'mtp': {path} has no multi-token-prediction "
                                 "layer (config.json num_nextn_predict_layers is absent or 0): use 'ngram' or "
                                 "'draft_model', or train a head with `moe distill --student mtp` and give it as "
                                 "'model'")
            return MTPDrafter(mtp, self.dtype, self.device)
        return DraftModel(spec.model, self.model_config.vocab_size, self.dtype, self.device)

    def _proposer(self, spec: SpeculativeConfig) -> Proposer:
        if spec.cost_control:  # (with ngram_first, lookup and the drafter probe apart: they share the budget)
            self.spec_cost = SpecCostModel(spec.num_speculative_tokens,
                                           sources=2 if spec.ngram_first and self.drafter is not None else 1)
        if self.drafter is None:
            return NgramProposer(spec, self.max_model_len)
        self._lookup = NgramProposer(spec, self.max_model_len) if spec.ngram_first else None
        return DraftModelProposer(self.drafter, spec.num_speculative_tokens, self.max_model_len,
                                  self.sampler.generator, self.spec_cost, self._lookup)

    def _choose_k(self) -> bool | None:
        """Cost control: each draft source's K for the next step, from its acceptance and the step
        costs. Returns whether the step is a probe (some source drafts for a share of the batch);
        None for a quiet step (plain decoding known to stand: nothing asked)."""
        n = len(self.scheduler.running)
        if self._quiet[1] and self._quiet[0] == n:  # plain decoding stands: every K stays 0, nothing to ask
            self._quiet[1] -= 1
            return None
        cost = self.spec_cost
        proposers = [p for p in (self.proposer, self._lookup) if p is not None]  # (_lookup: ngram_first's)
        if self._skipped:  # the drafter missed the last step's rows: first a plain step whose rows it keeps
            for p in proposers:
                p.k = 0
                p.set_probe(None, self.scheduler.running)
            self._quiet = [n, 0]
            return False
        refresh = cost.refresh_plain(n)
        for p in proposers:
            p.k = 0 if refresh else cost.choose_k(n, p.source)
            probing = cost.probing[p.source] and not refresh
            p.set_probe(cost.probe_size(n) if probing else None, self.scheduler.running)
        self._probing = [p.source for p in proposers if p.probe_left is not None]  # (their losses: _observe_step)
        probe = bool(self._probing)
        quiet = 0
        if not refresh and not probe and not any(p.k for p in proposers):
            # the steps for which every source's choice is known to stay plain are skipped (a batch-1
            # step of the default model is ~0.3 ms: the choice's own ~15 us was 5% of it)
            quiet = min(cost.quiet_steps(n, p.source) for p in proposers)
            for p in proposers:
                cost.skip(n, p.source, quiet)
        self._quiet = [n, quiet]  # (none after any other choice: the next step asks again)
        self._dormant = quiet > 0 and self.drafter is not None and cost.hopeless(n, "model")
        return probe

    def _asked_k(self, source: str) -> int | None:
        """The K the step asked ``source`` (a proposer's ``source``) for."""
        for p in (self.proposer, self._lookup):
            if p is not None and p.source == source:
                return p.k
        return None

    def kv_bytes_per_token(self) -> int:
        """KV cache bytes per token: the target's, plus the drafter's (its cache has the same blocks)."""
        own = sum(s.bytes_per_token(self.dtype, self.kv_fp8) for s in self.model.kv_cache_spec())
        return own + (self.drafter.kv_bytes_per_token(self.kv_fp8) if self.drafter is not None else 0)

    def _allocate_kv_cache(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        bs = self.config.block_size
        per_block = self.kv_bytes_per_token() * bs
        if self.config.kv_cache_memory is None:
            budget = per_block * self.config.max_num_seqs * -(-self.max_model_len // bs)
            budget = min(budget, 2 * 1024**3)
        else:
            budget = parse_bytes(self.config.kv_cache_memory)
        num_blocks = budget // per_block
        num_blocks = self.lockstep.agree_min(num_blocks)  # one block manager on every rank
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={self.config.kv_cache_memory!r} is smaller than one KV block "
                             f"({per_block} bytes at block_size {bs}); give the cache more memory")
        caches = [spec.allocate(num_blocks, bs, self.dtype, self.device, self.kv_fp8)
                  for spec in self.model.kv_cache_spec()]
        if self.drafter is not None:
            self.drafter.allocate_kv_cache(num_blocks, bs, self.kv_fp8)
        self.kv_cache_tokens = num_blocks * bs
        return caches, num_blocks

    # ---- requests -----------------------------------------------------------------------
    def tokenize(self, prompt: str | dict) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string or {{'prompt_token_ids': [...]}}, not {type(prompt).__name__}")
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json: pass {'prompt_token_ids': [...]} instead of text")
        return prompt, self.tokenizer.encode(prompt)

    def add_request(self, prompt: str | dict, params: SamplingParams | None = None,
                    request_id: str | None = None, stream: bool = False) -> str:
        """Validate and queue one request; raises ValueError (and changes nothing) if it is bad. ``stream``:
        a client reads its tokens as they come (a server's streamed answer): multi-step calls running it
        end after ``ModelRunner.STREAM_STEP_SECONDS``, so its tokens arrive at least that often."""
        params = params or SamplingParams(**self.default_sampling_params)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, not {type(params).__name__}")
        text, ids = self.tokenize(prompt)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model_config.vocab_size
        not_int = [t for t in ids if not hasattr(t, "__index__")]
        if not_int:
            raise ValueError(f"prompt_token_ids must be integers, got {not_int[:5]}")
        ids = [operator.index(t) for t in ids]  # accepts numpy / torch integers too
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id(s) {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                             "shorten the prompt or raise max_model_len (up to the model's context)")
        need = min(len(ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        if need > self.kv_cache_tokens:
            raise ValueError(f"the request may need {need} tokens of KV cache but the cache holds "
                             f"{self.kv_cache_tokens}: raise kv_cache_memory or lower max_tokens")
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self.seqs:
            raise ValueError(f"request id {rid!r} is already in use")
        salt = self._cache_salt(prompt)
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"SamplingParams.logit_bias={params.logit_bias!r} is invalid: token id "
                             f"{max(params.logit_bias)} is outside the vocabulary [0, {vocab})")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(params, name)
            if n is not None and 0 <= self.config.max_logprobs < n:
                raise ValueError(f"SamplingParams.{name}={n} is more than this engine returns "
                                 f"(max_logprobs={self.config.max_logprobs}): ask for fewer, or start the engine "
                                 "with a larger max_logprobs (-1: no limit)")
        if params.structured_outputs is not None:
            self._structured_outputs().compile(params.structured_outputs)  # a bad grammar fails here
        seqs: list[Sequence] = []
        for i in range(params.n):
            # vLLM's fan-out: sample i is a request of its own with n=1 and seed + i
            p = params if params.n == 1 else replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            gen = None
            if p.seed is not None:
                gen = torch.Generator()
                gen.manual_seed(p.seed)
            seq = Sequence(rid, text, ids, p, RequestMetrics(time.perf_counter(), num_prompt_tokens=len(ids)), gen,
                           self.sampler.new_key(p.seed), expected_len=need, sample_index=i,
                           leader=seqs[0] if seqs else None)
            seq.block_table.cache_salt = salt
            seq.streams = stream
            if p.structured_outputs is not None:
                seq.grammar = self._structured_outputs().new_state(p.structured_outputs)
            seqs.append(seq)
        self.seqs[rid] = seqs[0]
        self.samples[rid] = seqs
        for seq in seqs:
            self.scheduler.add(seq)
        return rid

    @staticmethod
    def _cache_salt(prompt: str | dict) -> str | None:
        """vLLM's per-request ``cache_salt``: prompts with different salts never share KV blocks."""
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise ValueError(f"cache_salt={salt!r} is invalid: give a non-empty string (or leave it out)")
        return salt

    def prepare_structured_output(self, params: SamplingParams) -> None:
        """Compile ``params``' grammar now (cached for :meth:`add_request`); safe to call from another
        thread while the engine steps, so a server compiles off the engine thread (a first grammar
        takes seconds: building the vocabulary's tables and compiling). ValueError if it is bad."""
        if params.structured_outputs is not None:
            self._structured_outputs().compile(params.structured_outputs)

    def _structured_outputs(self) -> StructuredOutputManager:
        with self._structured_lock:
            return self._structured_outputs_locked()

    def _structured_outputs_locked(self) -> StructuredOutputManager:
        if self._structured is None:
            if self.tokenizer is None:
                raise ValueError("SamplingParams.structured_outputs needs the checkpoint's tokenizer.json "
                                 "(grammars are matched against token strings): add it or drop structured_outputs")
            self._structured = StructuredOutputManager(self.tokenizer, self.model_config.vocab_size, self.eos_ids)
        return self._structured

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Stop a request and free its KV blocks. Returns its last outputs, one per sample still
        running (``finish_reason`` "abort"; the delta holds any text held back for a possible stop
        string), the last one ``finished``; empty if the request is unknown or already finished."""
        samples = [s for s in self.samples.get(request_id, []) if not s.is_finished]
        now = time.perf_counter()
        for seq in samples:
            seq.finish_reason = "abort"
            seq.metrics.finished_time = now
            self.scheduler.finish(seq)
        outs = [self._output(seq, (seq.take_stream_text(), []), last_update=j == len(samples) - 1)
                for j, seq in enumerate(samples)]
        self.seqs.pop(request_id, None)
        self.samples.pop(request_id, None)
        return outs

    def wake(self) -> None:
        """Work has arrived (from another thread): a multi-step call running ends after its current step."""
        self.runner.wake.value += 1

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t_start = time.perf_counter()
        probe = self._choose_k() if self.spec_cost is not None else False
        if self.spec is not None and self._max_steps > 1:
            self.scheduler.max_steps = self._steps_allowed(probe)
        batch = self.scheduler.schedule()
        if not batch:
            return []
        multi = batch.seqs[0].steps > 1
        # a dormant drafter skips a quiet step's rows when more quiet steps follow and no sequence can
        # draft next step regardless (its own seed) or brings a prompt chunk (those rows always reach it);
        # of a multi-step call an MTP layer keeps the last row, so no plain step must follow before it
        # drafts again (a draft model runs the tokens it owes when it drafts)
        self.runner.skip_drafter = skip = (
            probe is None and self._dormant and self._quiet[1] > 0
            and all(s.num_new_tokens == 1 and s.seq.generator is None for s in batch.seqs))
        self._skipped = skip and not (multi and self.drafter.reads_hidden)
        result = self._run(batch)
        if multi and self.spec_cost is not None:
            self._count_plain_steps(len(batch.seqs), len(result.sampled.get(0, ())) - 1)
        # cost control times one in QUIET_SAMPLE of the quiet steps that drafted nothing (alike: their
        # bookkeeping, ~5 us, was 1.5% of a batch-1 step of the default model), every other step
        observe = self.spec_cost is not None and (probe is not None or self._quiet[1] % self.QUIET_SAMPLE == 0
                                                  or any(s.draft for s in batch.seqs))
        # (asked before _postprocess moves the sequences on: ScheduledSeq.samples reads them)
        decode_only = observe and all(s.samples and s.num_new_tokens == 1 + len(s.draft) for s in batch.seqs)
        updated = self._postprocess(batch, result)
        # with n > 1, only a request's last update of the step may say it finished
        last = {seq.request_id: j for j, (seq, _) in enumerate(updated)}
        outs = [self._output(seq, delta, last[seq.request_id] == j) for j, (seq, delta) in enumerate(updated)]
        if observe:
            self._observe_step(batch, result, bool(probe), decode_only, time.perf_counter() - t_start)
        return outs

    def _steps_allowed(self, probe: bool | None) -> int:
        """Multi-step decoding's steps at most under speculation: on a step where no source drafts (no
        probe, every K 0; an MTP drafter gets the call's hidden states, ``Drafter.catch_up_steps``).
        Plain decoding's cost is then the multi-step calls' per token (_observe_step)."""
        if probe or any(p.k for p in (self.proposer, self._lookup) if p is not None):
            return 1
        return self._max_steps

    def _count_plain_steps(self, batch_size: int, extra: int) -> None:
        """A multi-step call's ``extra`` steps past its first, as plain steps: the quiet steps left first,
        then counted with cost control as its choices of plain decoding (so probes fall due per token)."""
        q = self._quiet[1]
        self._quiet[1] = max(0, q - extra)
        if extra > q:
            for p in (self.proposer, self._lookup):
                if p is not None:
                    self.spec_cost.skip(batch_size, p.source, extra - q)

    def _run(self, batch: ScheduledBatch) -> StepResult:
        return self.lockstep.run(batch, lambda: self.runner.run(batch, self.eos_ids))

    def _observe_step(self, batch: ScheduledBatch, result: StepResult, probe: bool, decode_only: bool,
                      seconds: float) -> None:
        """Feed cost control a whole step (scheduling, lookups, the model, acceptance, outputs): per
        source asked to draft, how many sequences had a draft and how long; then a probe's time
        and yield, or, for a decoding step (``decode_only``: no prompt chunk), its time less the
        drafter's steps (costed apart) against its draft rows per sequence. (A probe's few drafting
        sequences say nothing about a step where all are asked.)"""
        cost, drafting, asked, drew = self.spec_cost, 0.0, False, []
        for p in (self.proposer, self._lookup):
            asked |= p is not None and p.counts.asked > 0
            if p is not None and (p.counts.asked or p.counts.seconds):  # (at K = 0 nothing was asked)
                counts, p.counts = p.counts, DraftCounts()
                drafting += counts.seconds
                if p.k:
                    cost.observe_drafting(p.source, counts.asked, counts.drafting, counts.tokens, p.k)
                    if counts.drafting:
                        drew.append(p.source)
        if probe:
            tokens = sum(len(result.sampled.get(b, ())) for b in range(len(batch.seqs)))
            cost.observe_probe(len(batch.seqs), seconds, tokens, self._probing)
            return
        if decode_only:
            if batch.seqs[0].steps > 1:  # a multi-step call: the plain steps' cost is per token
                seconds /= max(len(result.sampled.get(0, ())), 1)
            rows = sum(len(s.draft) for s in batch.seqs) / len(batch.seqs)
            cost.observe_verify(rows, len(batch.seqs), seconds - drafting, asked)
            if drew:  # the whole step's speed against plain decoding's: the check on the prediction
                tokens = sum(len(result.sampled.get(b, ())) for b in range(len(batch.seqs)))
                cost.observe_realized(drew, len(batch.seqs), seconds, tokens)

    @property
    def spec_drafted(self) -> int:
        """Draft tokens run (speculative decoding)."""
        return self._spec_stats.num_draft_tokens

    @property
    def spec_accepted(self) -> int:
        """Draft tokens the model confirmed."""
        return self._spec_stats.num_accepted_tokens

    def spec_stats(self) -> SpecStats:
        """Acceptance rate, mean acceptance length and acceptance per draft position, since start."""
        return self._spec_stats

    @property
    def sampling_mismatches(self) -> int:
        """Steps where this rank sampled differently from its data-parallel group's first rank."""
        return self.lockstep.sampling_mismatches

    def _postprocess(self, batch: ScheduledBatch, result: StepResult) -> list[tuple[Sequence, tuple[str, list[int]]]]:
        now = time.perf_counter()
        updated = []
        for b, s in enumerate(batch.seqs):
            seq = s.seq
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = now
            samples = result.sampled.get(b, [])
            # the real tokens' K/V, plus the draft tokens the model confirmed (rejected rows are dead), or
            # those of a multi-step call's tokens but its last
            accepted = max(len(samples) - 1, 0) if s.draft or s.steps > 1 else 0
            self._spec_stats.record(len(s.draft), accepted)
            # (not a drafter's for a sequence whose rows it missed while dormant: those drafts are worse)
            if self.spec_cost is not None and s.draft and (s.draft_source != "model" or self.drafter.whole(s.seq)):
                self.spec_cost.observe_acceptance(len(s.draft), accepted, s.draft_source, self._asked_k(s.draft_source))
            seq.num_computed_tokens += s.num_new_tokens - len(s.draft) + accepted
            if seq.wants_prompt_logprobs:
                if not seq.prompt_logprobs:
                    seq.prompt_logprobs.append(None)
                seq.prompt_logprobs.extend(result.prompt_logprobs.get(b, []))
            if not samples:
                self._register_blocks(seq)
                continue
            tokens = []
            for token, lps in samples:
                seq.token_ids.append(token)
                tokens.append(token)
                if lps is not None:
                    seq.output_logprobs.append(lps)
                seq.metrics.num_generated = seq.num_output_tokens
                if seq.metrics.first_token_time is None:
                    seq.metrics.first_token_time = now
                self._check_stop(seq, token, self._detokenize(seq))
                if seq.grammar is not None:
                    self._advance_grammar(seq, token)
                if seq.is_finished or seq.finish_reason is not None:
                    break  # later accepted tokens are past the stop
            self._register_blocks(seq)  # after the accepted draft tokens joined token_ids
            if seq.is_finished or seq.finish_reason is not None:
                seq.metrics.finished_time = now
                self.scheduler.finish(seq)
            # after the stop checks, which may cut the text; a possible partial stop string waits
            updated.append((seq, (seq.take_stream_text(), tokens)))
        return updated

    def expert_counts(self) -> torch.Tensor:
        """``[moe_layers, num_experts]`` int64: tokens routed to each expert since the engine started
        (``record_expert_counts=True``), over the whole job. Under data parallelism every rank
        must call it (one all-reduce over the data-parallel groups)."""
        if not self.config.record_expert_counts:
            raise ValueError("expert counts are not recorded: build the LLM with record_expert_counts=True")
        counts = torch.stack([m.counts_E for m in self.model.sparse_layers()])
        return self.lockstep.sum_over_data_parallel(counts)  # each data-parallel group counted its own tokens

    def _register_blocks(self, seq: Sequence) -> None:
        """Offer the sequence's now completely computed blocks to the prefix cache (a draft model's
        side of them may come later or never: see ``Block.aux_written``)."""
        self.scheduler.block_manager_of(seq).register_full_blocks(seq.block_table, seq.token_ids,
                                                                  seq.num_computed_tokens)

    def _detokenize(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        new, seq.prefix_offset, seq.read_offset = detokenize_incrementally(
            self.tokenizer, seq.token_ids, seq.prefix_offset, seq.read_offset, seq.params.skip_special_tokens)
        seq.text += new
        return new

    def _check_stop(self, seq: Sequence, token: int, new_text: str) -> None:
        p = seq.params
        n_out = seq.num_output_tokens
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_ids:
                seq.finish_reason = "stop"
                return
            if p.stop_token_ids and token in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
                return
            for stop in p.stop_strings:
                # only a match that ends in this step's new text is new
                idx = seq.text.find(stop, max(0, len(seq.text) - len(new_text) - len(stop) + 1))
                if idx != -1:
                    seq.text = seq.text[: idx + len(stop)] if p.include_stop_str_in_output else seq.text[:idx]
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    return
        if (p.max_tokens is not None and n_out >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    def _advance_grammar(self, seq: Sequence, token: int) -> None:
        """Move the sample's grammar past ``token``; once the grammar has ended, so has the sample."""
        if seq.finish_reason is not None and token in self.eos_ids:
            return  # the EOS that ended it (the grammar allowed it, or min_tokens was past)
        if not seq.grammar.accept(token):
            # only when min_tokens forced a token the grammar did not allow (it allowed only EOS)
            log.warning("request %s: token %d does not fit its grammar; finishing it", seq.request_id, token)
            seq.finish_reason = seq.finish_reason or "stop"
        elif seq.grammar.is_terminated and seq.finish_reason is None:
            seq.finish_reason = "stop"

    def _output(self, seq: Sequence, delta: tuple[str, list[int]] | None = None,
                last_update: bool = True) -> RequestOutput:
        """The request's output after ``seq`` advanced by ``delta``. ``last_update``: no other sample
        of the request is reported later in this step (only then may the request be finished)."""
        samples = self.samples.get(seq.request_id, [seq])
        finished = last_update and all(s.finish_reason is not None for s in samples)
        comps = [self._completion(s) for s in samples]
        delta_out = None
        if delta is not None:
            text, tokens = delta
            lps = seq.output_logprobs[len(seq.output_logprobs) - len(tokens):] \
                if seq.params.logprobs is not None else None  # (speculation: several tokens a step)
            delta_out = CompletionOutput(seq.sample_index, text, tokens, lps, seq.finish_reason, seq.stop_reason)
        if finished:
            self.seqs.pop(seq.request_id, None)
            self.samples.pop(seq.request_id, None)
        metrics = seq.metrics if len(samples) == 1 else _request_metrics(samples)
        return RequestOutput(seq.request_id, seq.prompt, list(seq.prompt_token_ids), comps, finished, metrics,
                             list(seq.prompt_logprobs) if seq.wants_prompt_logprobs else None, delta=delta_out)

    @staticmethod
    def _completion(seq: Sequence) -> CompletionOutput:
        return CompletionOutput(seq.sample_index, seq.text, seq.output_token_ids,  # (a new list: a slice)
                                list(seq.output_logprobs) if seq.params.logprobs is not None else None,
                                seq.finish_reason, seq.stop_reason)

    def stats(self) -> EngineStats:
        """Load and counters for monitoring (summed over data-parallel groups' block managers)."""
        bms = self.block_managers
        total = sum(bm.num_blocks for bm in bms)
        free = sum(bm.num_free_blocks for bm in bms)
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=(total - free) / total, num_free_blocks=free, num_total_blocks=total,
            prefix_cache_queries=sum(bm.prefix_query_tokens for bm in bms),
            prefix_cache_hits=sum(bm.prefix_hit_tokens for bm in bms),
            spec_num_draft_tokens=self.spec_drafted, spec_num_accepted_tokens=self.spec_accepted)


def _request_metrics(samples: list[Sequence]) -> RequestMetrics:
    """One request's metrics from its samples': first scheduled / first token of any, finished
    when the last one finished, tokens of all."""
    ms = [s.metrics for s in samples]

    def first(values):
        known = [v for v in values if v is not None]
        return min(known) if known else None

    done = all(m.finished_time is not None for m in ms)
    return RequestMetrics(ms[0].arrival_time, first(m.first_scheduled_time for m in ms),
                          first(m.first_token_time for m in ms), max(m.finished_time for m in ms) if done else None,
                          sum(m.num_generated for m in ms), ms[0].num_prompt_tokens)
