"""``moe distill``: knowledge distillation from a teacher checkpoint into a student.

1. The text (``data``) becomes windows of ``seq_len + 1`` tokens (the teacher's tokenizer; a ``.jsonl``
   file of token-id lists is taken as it is); every 20th is held out unless ``eval_data`` is given.
2. Our engine runs the teacher over the windows and keeps its top-k log-probs per position
   (:mod:`moe.distill_data`; cached in ``<out>/distill_state/``).
3. The student (:mod:`moe.distill_student`: a drafter cut from the teacher, or an existing checkpoint
   such as a pruned teacher, its routers and experts or, with ``train="all"``, every weight; or
   :mod:`moe.distill_mtp`: an MTP-style head on the teacher's hidden states) trains in torch on
   ``loss = KL(p || q) + alpha * CE(label)`` (the label: the text's next token, or with
   ``hard_label="teacher"`` the teacher's first choice), where ``p`` is the teacher's top-k renormalised and
   ``q`` the student's softmax over the same k tokens (zero when the student ranks and weighs them as the
   teacher does, whatever the rest of the vocabulary; the hard-label CE keeps its mass there in check).
   A recovery may add ``hidden_weight * H``: each decoder layer's output matched to the teacher's (run in
   torch beside the student, float32), ``H`` the mean over layers of the squared error over the teacher's
   mean squared norm there.
4. Checkpoints every ``save_every`` steps let ``resume`` continue bit-for-bit; the result is a standard
   Hugging Face checkpoint (+ the teacher's tokenizer) with a ``training_report.json``.

The student (and the torch teacher of ``hidden_weight``) train on ``device``: a CUDA GPU when torch sees
one, else the CPU. ``bf16`` runs their forward passes under bf16 autocast (mixed precision: weights,
gradients, optimizer state and the losses stay float32), as a GPU run usually wants.

Shapes: B windows in a batch, L positions, V vocabulary, k teacher log-probs kept.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .distill_data import TeacherTopK, batches, cached_engine_topk, data_stream, progress_bar, split_heldout, windows
from .distill_mtp import MTPHead
from .distill_student import build_draft_student, load_student, save_student, select_trainable

STATE_DIR = "distill_state"
TRAIN_CHOICES = ("router+experts", "all")  # what a recovered checkpoint (--student PATH) trains
NEW_STUDENTS = ("draft", "mtp")  # students built from the teacher (anything else is a checkpoint directory)
# learning rate, hard-label weight and teacher log-probs kept, by student: a drafter or MTP head learns from
# scratch; a recovery starts at the teacher's own weights, which a high rate first drives away from it
# (a REAP-pruned default model, 200 steps of routers + experts: held-out agreement 0.906 at lr 1e-3 /
# alpha 0.1 / top-32, 0.913 at 3e-4, 0.919 at 3e-4 / alpha 0 / top-64; docs/speculative.md)
STUDENT_DEFAULTS = {"new": {"lr": 1e-3, "alpha": 0.1, "top_k": 32},
                    "recovery": {"lr": 3e-4, "alpha": 0.0, "top_k": 64}}
HARD_LABELS = ("data", "teacher")  # the cross-entropy's label: the text's next token, or the teacher's top-1


@dataclass(frozen=True)
class DistillConfig:
    teacher: str
    student: str  # "draft", "mtp" or a checkpoint directory
    data: str
    out: str
    eval_data: str | None = None
    draft_layers: int = 1
    draft_mlp: str = "moe"  # drafter / MTP head: "moe" (the teacher's layers) or "dense" (SwiGLU MLP layers)
    draft_intermediate: int | None = None  # dense drafter MLP width (None: the teacher config's intermediate_size)
    train: str = "router+experts"  # recovery (--student PATH): "router+experts" or "all" (every weight)
    lora_rank: int = 0
    steps: int = 200
    seq_len: int = 256
    batch_size: int = 8
    lr: float | None = None  # None: the student kind's (STUDENT_DEFAULTS), as alpha and top_k
    alpha: float | None = None  # weight of the hard-label cross-entropy
    hard_label: str = "data"  # its label: the text's next token ("data") or the teacher's first choice ("teacher")
    hidden_weight: float = 0.0  # recovery: weight of every layer's output matched to the teacher's (hidden_match)
    top_k: int | None = None
    seed: int = 0
    teacher_windows: int = 0  # windows the teacher scores for training (0: steps * batch_size, at most all)
    eval_windows: int = 64
    teacher_dtype: str = "auto"
    save_every: int = 50
    threads: int = 0  # torch threads (0: torch's default)
    device: str = "auto"  # where the student trains: "auto" (cuda when torch sees a GPU, else cpu), cpu, cuda[:N]
    bf16: bool = False  # forward passes under bf16 autocast (float32 weights, optimizer state and losses)

    def __post_init__(self) -> None:
        defaults = STUDENT_DEFAULTS["new" if self.student in NEW_STUDENTS else "recovery"]
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name in ("steps", "seq_len", "batch_size", "top_k", "eval_windows", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if self.lr <= 0 or self.alpha < 0 or self.hidden_weight < 0:
            raise ValueError(f"--lr {self.lr} must be > 0, --alpha {self.alpha} and --hidden-weight "
                             f"{self.hidden_weight} >= 0")
        if self.hidden_weight and self.student in NEW_STUDENTS:
            raise ValueError(f"--hidden-weight matches a recovered checkpoint's layers to the teacher's, one to one; "
                             f"--student {self.student} has no such layers (drop --hidden-weight)")
        if self.hard_label not in HARD_LABELS:
            raise ValueError(f"--hard-label {self.hard_label!r}: choose {' or '.join(HARD_LABELS)}")
        if self.lora_rank < 0 or self.teacher_windows < 0 or self.threads < 0:
            raise ValueError("--lora-rank, --teacher-windows and --threads must be >= 0")
        resolve_device(self.device)  # a bad or absent device fails here, before the teacher is scored
        if not (Path(self.teacher) / "config.json").is_file():
            raise FileNotFoundError(f"--teacher {self.teacher}: no config.json there; give a checkpoint directory")
        if self.student in NEW_STUDENTS and self.lora_rank:
            raise ValueError("--lora-rank applies to recovering an existing checkpoint (--student PATH), "
                             f"not to --student {self.student}, which trains all its weights")
        if self.train not in TRAIN_CHOICES:
            raise ValueError(f"--train {self.train!r}: choose {' or '.join(TRAIN_CHOICES)}")
        if self.train == "all" and self.lora_rank:
            raise ValueError("--lora-rank trains adapters on the experts with the rest frozen; "
                             "drop it to --train all")
        context = json.loads((Path(self.teacher) / "config.json").read_text()).get("max_position_embeddings")
        if context and self.seq_len + 1 > context:
            raise ValueError(f"--seq-len {self.seq_len}: windows of {self.seq_len + 1} tokens exceed the teacher's "
                             f"context ({context}); choose --seq-len below {context}")
        if self.student not in NEW_STUDENTS and not (Path(self.student) / "config.json").is_file():
            raise FileNotFoundError(f"--student {self.student}: give 'draft', 'mtp' or a checkpoint directory "
                                    "(with config.json)")

    @property
    def state_dir(self) -> Path:
        return Path(self.out) / STATE_DIR

    def fingerprint(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint."""
        d = asdict(self)
        for name in ("out", "save_every", "threads", "device"):  # a run may resume on another device
            d.pop(name)
        return d


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` is the first CUDA GPU when torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: not a device torch knows ({e}); choose auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}, "
                         f"torch.cuda.is_available() is False); use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s); "
                         f"choose cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: distillation runs on cpu or cuda[:N]")
    return device


def autocast(device: torch.device, bf16: bool):
    """The forward passes' precision: bf16 autocast with ``bf16``, else float32 (autocast off)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def topk_kl(logits_BLV: torch.Tensor, teacher: TeacherTopK) -> torch.Tensor:
    """Mean over positions of ``sum_k p_k (log p_k - log q_k)``: p the teacher's top-k renormalised, q the
    student's softmax over the same k tokens."""
    logq_BLk = torch.log_softmax(logits_BLV.float().gather(-1, teacher.ids_NLk.long()), dim=-1)
    logp_BLk = torch.log_softmax(teacher.logprobs_NLk.float(), dim=-1)
    return (logp_BLk.exp() * (logp_BLk - logq_BLk)).sum(-1).mean()


def distill_loss(logits_BLV: torch.Tensor, targets_BL: torch.Tensor, teacher: TeacherTopK,
                 alpha: float) -> tuple[torch.Tensor, float, float]:
    kl = topk_kl(logits_BLV, teacher)
    ce = F.cross_entropy(logits_BLV.flatten(0, 1).float(), targets_BL.flatten())
    return kl + alpha * ce, float(kl.detach()), float(ce.detach())


def hidden_match(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over decoder layers of ``|h_s - h_t|^2 / |h_t|^2`` (means over batch, positions and dims): the
    ``hidden_states`` of a transformers forward, the embeddings (entry 0) left out."""
    return torch.stack([(s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean()
                        for s, t in zip(student[1:], teacher[1:], strict=True)]).mean()


def predict(model: torch.nn.Module, wins: torch.Tensor, teacher: TeacherTopK, hidden: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, TeacherTopK] | tuple[torch.Tensor, torch.Tensor, TeacherTopK, tuple]:
    """The student's logits over windows ``[B, L + 1]``, the tokens they predict and the teacher's view of the
    same positions: next tokens for a causal LM, the token after for an MTP head (:class:`MTPHead`); with
    ``hidden`` (a causal LM) also its hidden states."""
    if isinstance(model, MTPHead):
        return model(wins), wins[:, 1 + model.shift:], teacher.skip(model.shift)
    if hidden:
        out = model(input_ids=wins[:, :-1], output_hidden_states=True)
        return out.logits, wins[:, 1:], teacher, out.hidden_states
    return model(input_ids=wins[:, :-1]).logits, wins[:, 1:], teacher


@torch.no_grad()
def evaluate(model: torch.nn.Module, wins: torch.Tensor, teacher: TeacherTopK, batch_size: int,
             device: torch.device = torch.device("cpu"), bf16: bool = False) -> dict[str, float]:
    """Held-out KL to the teacher (as in the loss), top-1 agreement with it, and the student's perplexity
    (``model`` on ``device``; the windows and ``teacher`` anywhere)."""
    model.eval()
    kl_sum = agree = nll = 0.0
    n_pos = 0
    for rows in batches(len(wins), batch_size):
        rows = torch.tensor(list(rows))
        with parametrize.cached(), autocast(device, bf16):
            logits, targets, t = predict(model, wins[rows].to(device), teacher.select(rows).to(device))
        logits = logits.float()
        n = targets.numel()
        kl_sum += float(topk_kl(logits, t)) * n
        agree += float((logits.argmax(-1) == t.top1_NL).sum())
        nll += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        n_pos += n
    model.train()
    return {"kl": round(kl_sum / n_pos, 5), "top1_agreement": round(agree / n_pos, 5),
            "perplexity": round(math.exp(nll / n_pos), 4), "positions": n_pos}


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to a tenth."""
    warm = max(1, cfg.steps // 20)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def prepare_data(cfg: DistillConfig, progress: bool) -> tuple[torch.Tensor, TeacherTopK, torch.Tensor, TeacherTopK]:
    """(train windows, their teacher top-k, held-out windows, their teacher top-k)."""
    wins = windows(data_stream(cfg.data, cfg.teacher), cfg.seq_len)
    if cfg.eval_data:
        train, held = wins, windows(data_stream(cfg.eval_data, cfg.teacher), cfg.seq_len)
    else:
        train, held = split_heldout(wins)
    held = held[: cfg.eval_windows]
    n_train = cfg.teacher_windows or cfg.steps * cfg.batch_size
    if n_train < len(train):  # a seeded subset, so the teacher scores only what training can use
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[:n_train]
        train = train[pick.sort().values]
    cache = cfg.state_dir
    return (train, cached_engine_topk(cfg.teacher, train, cfg.top_k, cache, cfg.teacher_dtype, progress),
            held, cached_engine_topk(cfg.teacher, held, cfg.top_k, cache, cfg.teacher_dtype, progress))


def _check_out(cfg: DistillConfig, resume: bool, force: bool) -> None:
    out = Path(cfg.out)
    if Path(cfg.teacher).resolve() == out.resolve() or (cfg.student not in NEW_STUDENTS
                                                        and Path(cfg.student).resolve() == out.resolve()):
        raise ValueError("--out must differ from --teacher and --student")
    if resume:
        if not (cfg.state_dir / "checkpoint.pt").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {cfg.state_dir}; start without --resume")
        return
    if out.exists() and any(p.name != STATE_DIR for p in out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out, pass --force, "
                              "or --resume an interrupted run")
    if (cfg.state_dir / "checkpoint.pt").is_file():
        (cfg.state_dir / "checkpoint.pt").unlink()  # a fresh run; the teacher cache stays


def command_line(cfg: DistillConfig) -> str:
    """The ``moe distill`` command that runs ``cfg`` (options left at their defaults are omitted)."""
    default = {f.name: f.default for f in fields(DistillConfig) if f.default is not MISSING}
    return "moe distill " + " ".join(f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {v}")
                                     for k, v in asdict(cfg).items()
                                     if k not in default or (v != default[k] and k not in ("threads", "device")))


def distill(cfg: DistillConfig, *, resume: bool = False, force: bool = False, stop_after: int | None = None,
            progress: bool = True) -> dict:
    """Run the distillation ``cfg`` describes; returns the training report (also written to
    ``<out>/training_report.json``). ``stop_after``: leave after that many steps of this call, with a
    checkpoint to ``resume`` from."""
    t0 = time.time()
    _check_out(cfg, resume, force)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from transformers import AutoConfig

    t_vocab = AutoConfig.from_pretrained(cfg.teacher).vocab_size
    if cfg.student == "draft":
        model, copied = build_draft_student(cfg.teacher, cfg.draft_layers, cfg.draft_mlp, cfg.draft_intermediate,
                                            cfg.seed)
        trainable = select_trainable(model, "all")
    elif cfg.student == "mtp":
        model = MTPHead(cfg.teacher, cfg.draft_mlp, cfg.draft_intermediate, cfg.seed)
        copied = model.copied
        trainable = select_trainable(model, "all")
    else:
        model, copied = load_student(cfg.student), []
        trainable = select_trainable(model, cfg.train, cfg.lora_rank, cfg.seed)
    if model.config.vocab_size != t_vocab:
        raise ValueError(f"the student's vocabulary ({model.config.vocab_size}) differs from the teacher's "
                         f"({t_vocab}): distillation needs the same tokenizer")
    torch_teacher = None
    if cfg.hidden_weight:  # the teacher's layer outputs, computed beside the student's each step
        torch_teacher = load_student(cfg.teacher).eval().requires_grad_(False)
        if torch_teacher.config.num_hidden_layers != model.config.num_hidden_layers:
            raise ValueError(f"--hidden-weight matches layers one to one, and the student has "
                             f"{model.config.num_hidden_layers} against the teacher's "
                             f"{torch_teacher.config.num_hidden_layers} (drop --hidden-weight)")
    train, train_top, held, held_top = prepare_data(cfg, progress)
    device = resolve_device(cfg.device)
    model.to(device)
    if torch_teacher is not None:
        torch_teacher.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, history, before = 0, [], None
    ckpt_path = cfg.state_dir / "checkpoint.pt"
    if resume:
        state = torch.load(ckpt_path, weights_only=False, map_location="cpu")  # copied onto the model's device
        if state["fingerprint"] != cfg.fingerprint():
            diff = [k for k, v in cfg.fingerprint().items() if state["fingerprint"].get(k) != v]
            raise ValueError(f"--resume: the checkpoint in {cfg.state_dir} was written with other options "
                             f"({', '.join(diff)}); resume with the same options or start afresh")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, history, before = state["step"], state["history"], state["before"]
    if before is None:
        before = evaluate(model, held, held_top, cfg.batch_size, device, cfg.bf16)
    model.train()
    bar = progress_bar(cfg.steps, "distill", enabled=progress, initial=step)
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    while step < end:
        rows = torch.randint(len(train), (cfg.batch_size,), generator=gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        wins = train[rows].to(device)
        with parametrize.cached():  # adapters: W + BA once per step, not once per expert access
            with autocast(device, cfg.bf16):
                logits, targets, teacher, *hs = predict(model, wins, train_top.select(rows).to(device),
                                                        hidden=torch_teacher is not None)
            labels = teacher.top1_NL.long() if cfg.hard_label == "teacher" else targets
            loss, kl, ce = distill_loss(logits, labels, teacher, cfg.alpha)
            if torch_teacher is not None:
                with torch.no_grad(), autocast(device, cfg.bf16):
                    t_hs = torch_teacher(input_ids=wins[:, :-1], output_hidden_states=True).hidden_states
                match = hidden_match(hs[0], t_hs)
                loss = loss + cfg.hidden_weight * match
                hidden = float(match.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        history.append([step, round(kl, 4), round(ce, 4)] + ([round(hidden, 4)] if torch_teacher else []))
        bar.set_postfix_str(f"kl {kl:.3f} ce {ce:.3f}" + (f" hidden {hidden:.3f}" if torch_teacher else ""))
        bar.update(1)
        if step % cfg.save_every == 0 or step == end:
            _save_state(ckpt_path, model, opt, gen, step, history, before, cfg)
    bar.close()
    report = {"finished": step >= cfg.steps, "steps": step}
    if step < cfg.steps:
        return report
    after = evaluate(model, held, held_top, cfg.batch_size, device, cfg.bf16)
    model.cpu()
    out = Path(cfg.out)
    if isinstance(model, MTPHead):
        model.save(out, _checkpoint_dtype(cfg.teacher))
    else:
        save_student(model, out, _checkpoint_dtype(cfg.teacher), Path(cfg.teacher))
    report.update({
        "command": command_line(cfg), "options": asdict(cfg), "teacher_windows": len(train),
        "heldout_windows": len(held),
        "tokens_per_step": cfg.batch_size * cfg.seq_len, "trainable_parameters": trainable,
        "initialised_from_teacher": len(copied), "heldout_before": before, "heldout_after": after,
        "teacher_heldout_perplexity": round(held_top.perplexity(), 4), "device": str(device),
        "loss_history_every_10": history[9::10], "seconds": round(time.time() - t0, 1),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    })
    (out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _checkpoint_dtype(model_dir: str) -> torch.dtype:
    """The dtype the teacher is stored in (the student is written in it too)."""
    hf = json.loads((Path(model_dir) / "config.json").read_text())
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return getattr(torch, str(name).removeprefix("torch."), torch.float32)


def _save_state(path: Path, model, opt, gen: torch.Generator, step: int, history: list, before: dict,
                cfg: DistillConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                "step": step, "history": history, "before": before, "fingerprint": cfg.fingerprint()}, tmp)
    tmp.replace(path)  # a crash mid-write leaves the previous checkpoint intact
