"""The ``tracerl`` command.

    tracerl train [CONFIG.yaml] [key=value ...] [--resume auto|DIR] [--ray-address HOST:PORT]   TraceRL
    tracerl eval [CONFIG.yaml] [key=value ...] [--out DIR] [--ray-address HOST:PORT]   held-out evaluation of model.path
    tracerl generate [CONFIG.yaml] [key=value ...] --prompt TEXT [--delay S --no-animate]   watch one prompt denoise
    tracerl validate [CONFIG.yaml] [key=value ...] [--offline]     check config, model, data, rewards, cluster
    tracerl sft [CONFIG.yaml] [key=value ...] [--resume auto|DIR]  masked-diffusion SFT
    tracerl train-reward-model [CONFIG.yaml] [key=value ...]       preference pairs → a reward model (TRL)
    tracerl export CHECKPOINT OUT_DIR [--adapter]                  write a Hugging Face model directory
    tracerl plot RUN_DIR [--sft SFT_RUN_DIR] [--out PNG]           before/after table and curves of a train run
    tracerl serve-reward --reward SPEC [--host --port --timeout]   serve a reward function over HTTP

Errors are one clear paragraph and exit code 2; ``--debug`` (before or after the command) shows the traceback,
``--verbose`` the third-party logs (Ray actors, DeepSpeed, W&B, transformers) that are hidden otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tracerl.config import Config, ConfigError
from tracerl.quiet import quiet_third_party
from tracerl.registry import UnknownName


def _split_config(args: list[str]) -> tuple[str | None, list[str]]:
    """The optional YAML path (first argument, if it is not key=value) and the overrides."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _config(ns: argparse.Namespace) -> Config:
    """The command's config: its YAML and overrides, then the flags that set config keys where the command has
    them (``--ray-address``: ``cluster.address``, ``--resume``: ``checkpoint.resume``)."""
    from tracerl.checks import load_config

    path, overrides = _split_config(ns.config)
    flags = (("ray_address", "cluster.address"), ("resume", "checkpoint.resume"))
    overrides = [*overrides, *(f"{key}={getattr(ns, flag)}" for flag, key in flags if getattr(ns, flag, None))]
    return load_config(path, overrides)


def cmd_generate(ns: argparse.Namespace) -> int:
    """Sample one response and replay its trace frame by frame: masks turn into tokens in commit order."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from tracerl.config import logp_temperature
    from tracerl.data import encode_prompt
    from tracerl.models import load_policy, load_tokenizer
    from tracerl.records import CanvasRollout
    from tracerl.sampling import check_positions, generate, renoising

    if not (math.isfinite(ns.delay) and ns.delay >= 0):
        raise ConfigError(
            f"--delay {ns.delay} is not a pause: give the seconds each denoising step shows, 0 or more (0: no pause), "
            "or --no-animate for the final text only."
        )
    cfg = _config(ns)
    tokenizer = load_tokenizer(cfg.model)  # the prompt is checked before the weights load
    prompt_ids = encode_prompt(tokenizer, ns.prompt, cfg.data)
    if not prompt_ids:
        raise ConfigError(
            f"--prompt {ns.prompt!r} has no tokens: the model needs a prompt to continue. Give it some text, e.g. "
            "--prompt '1+2='."
        )
    unk = tokenizer.unk_token_id
    if unk is not None and unk in prompt_ids and tokenizer.unk_token not in ns.prompt:
        unknown = sorted({c for c in ns.prompt if unk in tokenizer(c, add_special_tokens=False)["input_ids"]})
        where = f"model.tiny.alphabet={cfg.model.tiny.alphabet!r}" if cfg.model.path is None else "its vocabulary"
        raise ConfigError(
            f"--prompt has characters the tokenizer of the model does not know: {', '.join(map(repr, unknown))} "
            f"(they would all read as {tokenizer.unk_token}; the model knows {where}). Write the prompt "
            "with known characters."
        )
    policy = load_policy(cfg.model)
    check_positions(policy, len(prompt_ids), cfg.sampling, prompt_setting="--prompt")
    tau = 1.0 if renoising(policy) else logp_temperature(cfg) or 1.0  # the learner's (greedy: the model's own)
    rollout = generate(policy, [prompt_ids], cfg.sampling, seed=cfg.seed, logp_temperature=tau)
    if isinstance(rollout, CanvasRollout):
        return _show_canvases(ns, rollout, policy)
    ids, steps = rollout.response_ids[0].tolist(), rollout.step_map[0].tolist()
    last = max(steps) if max(steps) >= 0 else 0
    tok = policy.tokenizer
    console = Console()

    def frame(step: int) -> Text:
        text = Text(ns.prompt, style="bold")
        for token, at in zip(ids, steps, strict=True):
            if at < 0:
                break
            if at <= step:
                piece = tok.decode([token], skip_special_tokens=True) if token != policy.eos_id else "⏎"
                text.append(piece, style="green" if at == step else "dim" if token == policy.eos_id else "")
            else:
                text.append("░", style="dim")
        return text

    if ns.no_animate:
        console.print(frame(last))
    else:
        with Live(frame(-1), console=console, refresh_per_second=30) as live:
            for step in range(last + 1):
                time.sleep(ns.delay)
                live.update(frame(step))
        console.print()
    nfe = last + 1
    console.print(
        f"[dim]{sum(s >= 0 for s in steps)} tokens in {nfe} denoising steps · "
        f"mean log-prob {float(rollout.rollout_logp[0][rollout.response_mask[0]].mean()):.3f} at temperature {tau:g}"
        "[/dim]"
    )
    return 0


def canvas_frames(rollout, tokenizer, eos_ids: tuple[int, ...]) -> list:  # noqa: ANN001
    """One line per denoising step of every canvas of the first sample: the canvas the step produced, its accepted
    tokens in green (the policy's actions), the renoised positions dim (fresh uniform noise); then the output, bold
    through the first EOS and dim after it (canvas positions that are not part of the response)."""
    from rich.text import Text

    def piece(token: int) -> str:
        if token in eos_ids:
            return "⏎"
        text = tokenizer.decode([token], skip_special_tokens=True)
        return text if len(text) == 1 and text.isprintable() and not text.isspace() else "·"

    lines = []
    c = rollout.canvas_length
    for k in range(rollout.canvases.shape[1]):
        if not bool(rollout.canvas_valid[0, k]):
            break
        live = int(rollout.step_valid[0, k].sum())
        for j in range(live):
            accepted = rollout.accepted[0, k, j]
            after = rollout.canvases[0, k, j + 1] if j + 1 < live else None
            text = Text(f"canvas {k} step {j:>2} τ={float(rollout.temperature[j]):.2f} ", style="dim")
            for pos in range(c):
                if bool(accepted[pos]):
                    text.append(piece(int(rollout.accepted_ids[0, k, j, pos])), style="bold green")
                else:
                    text.append(piece(int(after[pos])) if after is not None else " ", style="dim")
            text.append(f"  {int(accepted.sum())} accepted", style="dim")
            lines.append(text)
        out = Text(f"canvas {k} output{' ' * 9}", style="dim")
        ids, kept = rollout.response_ids[0, k * c : (k + 1) * c], rollout.response_mask[0, k * c : (k + 1) * c]
        for token, counts in zip(ids.tolist(), kept.tolist(), strict=True):
            out.append(piece(token), style="bold" if counts else "dim")  # past the first EOS: not the response
        lines.append(out)
    return lines


def _show_canvases(ns: argparse.Namespace, rollout, policy) -> int:  # noqa: ANN001
    """``tracerl generate`` for a renoising model: every step of every canvas, accepted vs renoised positions."""
    from rich.console import Console

    console = Console()
    console.print(f"[bold]{ns.prompt}[/bold]")
    for line in canvas_frames(rollout, policy.tokenizer, policy.eos_ids):
        if not ns.no_animate:
            time.sleep(ns.delay)
        console.print(line)
    live = rollout.step_valid & rollout.canvas_valid[..., None]
    console.print(f"[bold]{rollout.texts[0]}[/bold]")
    console.print(
        f"[dim]{int(rollout.response_mask[0].sum())} tokens · {int(live[0].sum())} denoising steps over "
        f"{int(rollout.canvas_valid[0].sum())} canvas(es) · {int(rollout.accepted[0][live[0]].sum())} tokens "
        "accepted (green), the rest renoised each step (dim)[/dim]"
    )
    return 0


def cmd_validate(ns: argparse.Namespace) -> int:
    """Resolve and check everything a run needs, without training; ``--offline`` loads no weights and no hub data."""
    from rich.console import Console

    from tracerl.config import check_cluster, check_training, gpus_needed
    from tracerl.orchestrator import check_device, check_model, check_rewards, load_prompts, try_rewards
    from tracerl.orchestrator.setup import missing_answers

    console = Console()
    cfg = _config(ns)
    check_training(cfg)
    console.print(f"config: ok (seed {cfg.seed}, run_dir {cfg.run_dir})")
    c = cfg.cluster
    check_cluster(cfg, c.num_nodes * c.gpus_per_node, f"the declared cluster ({c.num_nodes} × {c.gpus_per_node} GPUs)")
    console.print(
        f"cluster: ok ({cfg.learner.num_ranks} learner rank(s), {cfg.rollout.num_workers} rollout actor(s), "
        f"{cfg.rollout.placement}, {gpus_needed(cfg)} of {c.num_nodes * c.gpus_per_node} GPUs)"
    )
    check_device(cfg, c.num_nodes * c.gpus_per_node)
    if cfg.checkpoint.resume not in ("none", "auto"):  # a checkpoint by path: train verifies it first; so does this
        from tracerl import runs

        runs.claim(cfg, "train")
        console.print(f"resume: ok ({cfg.checkpoint.resume})")
    if cfg.cluster.address and not ns.offline:
        from tracerl.orchestrator.setup import check_reachable

        check_reachable(cfg.cluster.address)
        console.print(f"cluster address: ok (a Ray cluster answers at {cfg.cluster.address})")
    from tracerl.orchestrator.guards import start_warnings
    from tracerl.orchestrator.setup import local_gpus

    here = (local_gpus(cfg) or 0.0) >= c.gpus_per_node  # a config for GPUs this machine lacks runs elsewhere
    for warning in start_warnings(cfg, (os.cpu_count() or 1) if here else None):
        console.print(f"[yellow]warning: {warning}[/yellow]")
    if not ns.offline:
        from tracerl.models import load_policy
        from tracerl.sampling import check_compatible, renoising, resolve_cache

        policy = load_policy(cfg.model)  # the weights too: they must load
        check_compatible(policy, cfg.sampling)
        params = sum(p.numel() for p in policy.model.parameters())
        if renoising(policy):
            shape = f"renoising canvases of {policy.canvas_length} tokens, EOS ids {list(policy.eos_ids)}"
        else:
            layout = "block" if policy.block_size else "full"
            shape = f"{layout} attention, mask id {policy.mask_id}, cache {resolve_cache(policy, cfg.sampling)}"
        console.print(f"model: ok ({cfg.model.family}, {params / 1e6:.2f}M parameters, {shape})")
        if cfg.learner.lora.enabled:
            from tracerl.models.lora import check_lora_targets

            console.print(f"lora: ok (adapters on {check_lora_targets(policy, cfg.learner.lora)} modules)")
    local_data = cfg.data.source.startswith("synthetic:") or os.path.exists(os.path.expanduser(cfg.data.source))
    if ns.offline and (not local_data or cfg.model.path and not os.path.isdir(cfg.model.path)):
        console.print(f"data: not checked offline (data.source '{cfg.data.source}' or the tokenizer is on the hub)")
        service, tried = check_rewards(cfg, None, cfg.data.source), ""
    else:
        stream, eval_set = load_prompts(cfg)
        check_model(cfg, max(len(ids) for ids in stream.ids + (eval_set.prompt_ids if eval_set else [])))
        held = len(eval_set.prompt_ids) if eval_set else 0
        console.print(
            f"data: ok ({len(stream.ids)} training prompts, {held} held out, {stream.dropped} dropped as longer than "
            "the limit; the tokenizer writes them; every sampler setting fits the model)"
        )
        service = check_rewards(cfg, stream.ds.column_names, cfg.data.source, load=not ns.offline, eval_set=eval_set)
        for warning in missing_answers(cfg, service, stream.ds, eval_set):
            console.print(f"[yellow]warning: {warning}[/yellow]")
        tried = "" if ns.offline else try_rewards(cfg, stream, service.trial)
    for reward in service.rewards:  # reward models and judges say what was checked
        describe = getattr(reward.fn, "describe", None)
        if callable(describe):
            console.print(f"reward '{reward.name}': ok ({describe()})")
    r = cfg.reward
    tried = f"; tried on the first row: {tried}" if tried else ""
    console.print(
        f"rewards: ok ({', '.join(f.fn for f in r.functions)}{tried}; sandbox minimum {r.sandbox.min_isolation})"
    )
    return 0


def _ray_env(address: str | None) -> None:
    """A local Ray instance stays on loopback; a cluster is joined with the authentication mode its nodes were
    started with by scripts/ray_cluster.sh (both read by Ray at import, so set before it)."""
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def cmd_train(ns: argparse.Namespace) -> int:
    cfg = _config(ns)
    _ray_env(cfg.cluster.address)
    from tracerl.orchestrator import run

    run(cfg, verbose=ns.verbose)
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    cfg = _config(ns)
    _ray_env(cfg.cluster.address)
    from tracerl.orchestrator import run_eval

    run_eval(cfg, out_dir=ns.out, verbose=ns.verbose)
    return 0


def cmd_sft(ns: argparse.Namespace) -> int:
    from rich.console import Console

    from tracerl.sft import run_sft

    cfg = _config(ns)
    run_sft(cfg, verbose=ns.verbose)
    out = cfg.run_dir.rstrip("/")
    Console().print(f"[dim]metrics: {out}/metrics.jsonl · model: {out}/final[/dim]", soft_wrap=True)
    return 0


def cmd_train_reward_model(ns: argparse.Namespace) -> int:
    from tracerl.reward_models.train import train_reward_model

    train_reward_model(_config(ns), verbose=ns.verbose)
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from tracerl.checkpoint import export_hf

    out = export_hf(ns.checkpoint, ns.out, adapter=ns.adapter)
    print(f"exported to {out}")
    return 0


def cmd_plot(ns: argparse.Namespace) -> int:
    """The before/after table of a train run's held-out evaluations, and its curves as a PNG."""
    from rich.console import Console
    from rich.table import Table

    from tracerl.report import before_after, plot_curves, read_metrics, start_label, table_rows

    for flag, folder, of in (("RUN_DIR", ns.run_dir, "train"), ("--sft", ns.sft, "sft")):
        if folder is not None and not os.path.isdir(folder):
            problem = "is a file" if os.path.exists(folder) else "does not exist"
            raise FileNotFoundError(f"{flag} '{folder}' {problem}; give the run_dir of a tracerl {of} run.")
    if ns.out is not None:  # where the PNG goes, checked before anything is drawn
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from tracerl.checkpoint import check_writable

        kinds = FigureCanvasAgg(Figure()).get_supported_filetypes()
        suffix = Path(ns.out).suffix.lower().lstrip(".")
        if suffix not in kinds:
            raise ConfigError(
                f"--out '{ns.out}' is not a picture file matplotlib writes: end it with one of "
                f"{', '.join(f'.{k}' for k in sorted(kinds))} (e.g. curves.png)."
            )
        check_writable(Path(ns.out).parent, "--out's folder")
    from tracerl.runs import read_owner

    for flag, folder, want in (("RUN_DIR", ns.run_dir, "train"), ("--sft", ns.sft, "sft")):
        wrote = (read_owner(Path(folder)) or {}).get("command") if folder is not None else None
        if wrote not in (None, want):
            fix = "give it as --sft beside the RL run's RUN_DIR" if wrote == "sft" else "give it as RUN_DIR"
            raise ConfigError(f"{flag} '{folder}' is a tracerl {wrote} run, not the {want} run it takes: {fix}.")
    from tracerl.checkpoint import checkpoint_holding

    for flag, folder in (("RUN_DIR", ns.run_dir), ("--sft", ns.sft)):
        if folder is not None and (inside := checkpoint_holding(folder)) is not None:
            raise FileNotFoundError(
                f"{flag} '{folder}' is in the checkpoint '{inside}', not a run_dir: give the run's folder, "
                f"'{inside.parent.parent}'."
            )
        if folder is not None:
            read_metrics(folder)  # both runs are read before anything is printed
    before, after = before_after(ns.run_dir)
    prompts = after["metrics"].get("eval/prompts")
    table = Table(title="held-out evaluation" + (f" ({int(prompts)} prompts)" if prompts is not None else ""))
    start = f"{start_label(ns.run_dir)} (step {before['step']})"
    for column in ("", start, f"after RL (step {after['step']})", "change"):
        table.add_column(column, justify="right" if column else "left")
    for label, b, a, change in table_rows(before, after):
        color = "green" if change > 0 else "red" if change < 0 else "dim"
        table.add_row(label, f"{b:.3f}", f"{a:.3f}", f"[{color}]{change:+.3f}[/]")
    curves = plot_curves(ns.run_dir, ns.out, ns.sft)
    console = Console()
    console.print(table)
    console.print(f"curves: {curves}")
    return 0


def cmd_serve_reward(ns: argparse.Namespace, rest: list[str]) -> int:
    from tracerl.reward_server import main as serve

    return serve([*rest, "--verbose"] if ns.verbose else rest)  # --verbose: one line per request


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracerl", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also accepted after the command)")
    parser.add_argument("--verbose", action="store_true", help="show third-party logs (also after the command)")
    sub = parser.add_subparsers(dest="command", required=True)
    config_help = "optional YAML file, then key=value overrides (e.g. sampling.temperature=0.7)"

    g = sub.add_parser("generate", help="watch one prompt denoise in the terminal")
    g.add_argument("config", nargs="*", help=config_help)
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--delay", type=float, default=0.05, help="seconds per denoising step in the animation")
    g.add_argument("--no-animate", action="store_true", help="print only the final text")
    g.set_defaults(fn=cmd_generate)

    v = sub.add_parser("validate", help="check config, model, data, rewards and cluster size without training")
    v.add_argument("config", nargs="*", help=config_help)
    v.add_argument("--offline", action="store_true", help="load no weights and no hub data (schema, names, sizes)")
    v.set_defaults(fn=cmd_validate)

    t = sub.add_parser("train", help="TraceRL: rollouts, rewards, learner updates, weight sync, eval")
    t.add_argument("config", nargs="*", help=config_help)
    t.add_argument("--resume", help="auto (latest complete checkpoint in run_dir) or a checkpoint directory")
    t.add_argument("--ray-address", help="HOST:PORT of a running Ray cluster (default: a local instance)")
    t.set_defaults(fn=cmd_train)

    ev = sub.add_parser("eval", help="evaluate model.path on the held-out prompts (greedy, mean@k, pass@k)")
    ev.add_argument("config", nargs="*", help=config_help)
    ev.add_argument("--out", help="directory of eval.jsonl and eval.json (default: <run_dir>/eval)")
    ev.add_argument("--ray-address", help="HOST:PORT of a running Ray cluster (default: a local instance)")
    ev.set_defaults(fn=cmd_eval)

    s = sub.add_parser("sft", help="masked-diffusion supervised fine-tuning")
    s.add_argument("config", nargs="*", help=config_help)
    s.add_argument("--resume", help="auto (latest complete checkpoint in run_dir) or a checkpoint directory")
    s.set_defaults(fn=cmd_sft)

    rm = sub.add_parser("train-reward-model", help="preference pairs → a reward-model directory (TRL RewardTrainer)")
    rm.add_argument("config", nargs="*", help=config_help)
    rm.set_defaults(fn=cmd_train_reward_model)

    e = sub.add_parser("export", help="write a Hugging Face directory from a checkpoint")
    e.add_argument("checkpoint", help="a checkpoint directory (run_dir/checkpoints/step-N)")
    e.add_argument("out", help="output directory")
    e.add_argument(
        "--adapter", action="store_true", help="write the LoRA adapter directory PEFT loads instead of the merged model"
    )
    e.set_defaults(fn=cmd_export)

    pl = sub.add_parser("plot", help="before/after table and reward / held-out curves (PNG) of a train run")
    pl.add_argument("run_dir", help="run_dir of a tracerl train run")
    pl.add_argument("--sft", help="run_dir of the SFT run it started from (adds an SFT panel)")
    pl.add_argument("--out", help="PNG path (default: RUN_DIR/curves.png)")
    pl.set_defaults(fn=cmd_plot)

    r = sub.add_parser("serve-reward", help="serve a reward function over HTTP (loopback by default)", add_help=False)
    r.set_defaults(fn=None)
    for command in sub.choices.values():  # the global flags, which every command takes before or after its name
        command.epilog = GLOBAL_FLAGS
    return parser


GLOBAL_FLAGS = (
    "--debug shows the traceback of an error; --verbose the third-party logs (Ray actors, DeepSpeed, W&B, "
    "transformers) that are hidden otherwise. Both go before or after the command."
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {"--debug", "--verbose"}
    debug, verbose = "--debug" in argv, "--verbose" in argv or "--debug" in argv
    words = [a for a in argv if a not in flags]  # the global flags go before or after the command
    if words[:1] == ["serve-reward"]:  # its own argument parser
        ns = argparse.Namespace(command="serve-reward", fn=lambda ns: cmd_serve_reward(ns, words[1:]))
    else:
        parser = build_parser()
        ns, rest = parser.parse_known_args(words)
        if rest and (any(a.startswith("-") for a in rest) or not hasattr(ns, "config")):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if rest:  # key=value overrides after an option (tracerl train c.yaml --resume auto seed=1)
            ns.config = [*ns.config, *rest]
        given = {f: getattr(ns, f, None) for f in ("resume", "out", "sft", "ray_address")}
        empty = [f for f, value in given.items() if isinstance(value, str) and not value.strip()]
        if empty:  # --resume "$CKPT" with CKPT unset would start a fresh run; --out '' wrote to the default folder
            flag = "--" + empty[0].replace("_", "-")
            print(
                f"tracerl {ns.command}: error: {flag} is given an empty value (an unset shell variable?), which "
                f"would act as if {flag} were left out; give it a value, or leave {flag} out.",
                file=sys.stderr,
            )
            return 2
    ns.debug, ns.verbose = debug, verbose
    quiet_third_party(verbose)
    fn: Callable[[argparse.Namespace], int] = ns.fn
    previous = None
    with contextlib.suppress(ValueError):  # SIGTERM as Ctrl-C from here on (the RL loop installs its own)
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return fn(ns)
    except KeyboardInterrupt:
        print(f"tracerl {ns.command}: interrupted.", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure becomes one paragraph unless --debug
        if debug:
            raise
        if type(err).__name__ == "Interrupted":  # a clean stop on Ctrl-C / SIGTERM, with a checkpoint
            print(f"tracerl {ns.command}: {err}", file=sys.stderr)
            return 130
        err = getattr(err, "cause", None) or err  # a Ray task failure: the actor's own error
        sentence = isinstance(err, UnknownName)  # registry.py's sentence; a bare KeyError (d[k]) is named below
        message = str(err)
        clear = ConfigError | ValueError | FileNotFoundError | FileExistsError | RuntimeError
        expected = isinstance(err, clear) or sentence
        kind = "" if expected else f"{type(err).__name__}: "
        hint = "" if expected else " (run with --debug for the traceback)"
        print(f"tracerl {ns.command}: error: {kind}{message}{hint}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM while a command starts (before the RL loop's own handler): stop as Ctrl-C does, so the actors
    already started are shut down and the command says it was interrupted (exit 130), instead of dying silently."""
    del signum, frame
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
