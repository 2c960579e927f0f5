"""``nasjax`` command line: parses flags and hands over to the library (no logic here).

nasjax data fetch shakespeare
nasjax train     --config=configs/train/lm.py:tiny --workdir=runs/a [--config.KEY=VALUE ...]
nasjax eval      --workdir=runs/a [--step=N] [--max_batches=N]
nasjax describe  bert --size=base | spec.json | --config=FILE[:preset] | --workdir=runs/a
nasjax finetune  --config=configs/train/finetune.py:tiny --workdir=runs/ft --config.data.path=X.jsonl
                 [--config.init_from=runs/ad/student --config.compare_with=teacher,scratch]   (comparison.csv)
nasjax search    --config=configs/search/primer.py:tiny --workdir=runs/s1   (same command resumes)
                 [--config.engine=ray --config.search.in_flight=4]   (4 evaluations at once on Ray actors)
                 [--coordinator=HOST:PORT --num_processes=N --process_id=I]   (one mesh over N processes)
nasjax results   runs/s1 [--top=N]   (results.csv, best_spec.json, best_program.txt, fitness.png)
nasjax search    --config=configs/search/lts.py:cpu --workdir=runs/lts   (pareto.csv, pareto.json, front/)
nasjax lts-validate --config=configs/search/lts.py:cpu --workdir=runs/val   (proxy Spearman correlations)
nasjax distil    --config=configs/search/autodistil.py:tiny --workdir=runs/ad --config.teacher=runs/teacher
nasjax distil-search --config=configs/search/autodistil.py:tiny --workdir=runs/ad --config.teacher=runs/teacher
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from nasjax import hostmem

USAGE = __doc__

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "FILE[:preset] holding get_config(); override keys with --config.KEY=VALUE.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots).")
flags.DEFINE_string("size", "tiny", "describe: zoo size (tiny, small, base).")
flags.DEFINE_integer("seq_len", 0, "describe: sequence length for FLOPs (0 = the spec's max_len, at most 512).")
flags.DEFINE_bool("xla", False, "describe: also measure FLOPs with XLA's cost analysis.")
flags.DEFINE_integer("step", None, "eval: checkpoint step (default: latest).")
flags.DEFINE_integer("max_batches", 0, "eval: validation batches (0 = all).")
flags.DEFINE_string("cache_dir", None, "data fetch: cache folder (default NASJAX_CACHE or ~/.cache/nasjax).")
flags.DEFINE_bool("force", False, "data fetch: download again even if present.")
flags.DEFINE_bool("progress", True, "train: show the progress bar.")
flags.DEFINE_integer("top", 10, "results: rows of the leaderboard.")
flags.DEFINE_string("coordinator", "", "search/train on several processes: HOST:PORT of process 0's coordinator.")
flags.DEFINE_integer("num_processes", 0, "search/train on several processes: how many.")
flags.DEFINE_integer("process_id", -1, "search/train on several processes: this one's index.")

EXIT_ERROR, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


def _need(flag: str, value, command: str):
    if not value:
        raise SystemExit(f"error: nasjax {command} needs --{flag}")
    return value


def _distributed() -> None:
    from nasjax.distributed import maybe_initialize

    maybe_initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)


def cmd_train(args: list[str]) -> int:
    hostmem.for_training()  # step-bound: one heap arena (before jax starts its threads)
    from nasjax.train import run

    cfg = _need("config", FLAGS.config, "train")
    _distributed()
    result = run.train(cfg, _need("workdir", FLAGS.workdir, "train"), progress=FLAGS.progress)
    return {"diverged": EXIT_DIVERGED, "interrupted": EXIT_INTERRUPTED}.get(result.status, 0)


def cmd_finetune(args: list[str]) -> int:
    if FLAGS.config is not None and "init_from" not in FLAGS.config:
        raise SystemExit("error: nasjax finetune needs a finetune config (e.g. configs/train/finetune.py:tiny)")
    hostmem.for_training()
    from nasjax.train.compare import finetune

    cfg = _need("config", FLAGS.config, "finetune")
    result = finetune(cfg, _need("workdir", FLAGS.workdir, "finetune"), progress=FLAGS.progress)
    return {"diverged": EXIT_DIVERGED, "interrupted": EXIT_INTERRUPTED}.get(result.status, 0)


def cmd_eval(args: list[str]) -> int:
    from nasjax.train import run

    val = run.evaluate(
        _need("workdir", FLAGS.workdir, "eval"),
        step=FLAGS.step,
        max_batches=FLAGS.max_batches,
    )
    print(run.format_eval(val))
    return 0


def cmd_describe(args: list[str]) -> int:
    from nasjax.measure.lookup import describe_target

    print(describe_target(args[0] if args else "", FLAGS.config, FLAGS.workdir, FLAGS.size, FLAGS.seq_len, FLAGS.xla))
    return 0


def cmd_data(args: list[str]) -> int:
    from nasjax.data import FETCHERS, fetch

    if len(args) != 2 or args[0] != "fetch":
        raise SystemExit(f"usage: nasjax data fetch NAME   (NAME one of: {', '.join(sorted(FETCHERS))})")
    path = fetch(args[1], cache_dir=FLAGS.cache_dir, force=FLAGS.force)
    print(path)
    return 0


def cmd_search(args: list[str]) -> int:
    from nasjax.search.results import export_results
    from nasjax.search.run import run_search

    cfg = _need("config", FLAGS.config, "search")
    workdir = _need("workdir", FLAGS.workdir, "search")
    _distributed()
    summary = run_search(cfg, workdir)
    if summary.status == "follower":  # process 1..N-1 of a multi-process search: no journal here
        for cid, stage, result in summary.extra["jobs"]:
            print(f"job {cid} {stage} ok={result['ok']} fitness={result.get('fitness')}")
        return 0
    print(export_results(workdir, top=FLAGS.top, log=lambda *a: None).leaderboard)
    return EXIT_INTERRUPTED if summary.status == "interrupted" else 0


def cmd_results(args: list[str]) -> int:
    from nasjax.search.results import export_results

    workdir = args[0] if args else FLAGS.workdir
    summary = export_results(_need("workdir", workdir, "results DIR"), top=FLAGS.top)
    print(summary.leaderboard)
    print("wrote " + ", ".join(summary.files))
    return 0


def cmd_lts_validate(args: list[str]) -> int:
    from nasjax.search.lts_validate import validate_proxies

    cfg = _need("config", FLAGS.config, "lts-validate")
    summary = validate_proxies(cfg, _need("workdir", FLAGS.workdir, "lts-validate"))
    print(summary.table)
    print("wrote " + ", ".join(summary.files))
    return 0


def cmd_distil(args: list[str]) -> int:
    from nasjax.search.autodistil import run_distil

    cfg = _need("config", FLAGS.config, "distil")
    run_distil(cfg, _need("workdir", FLAGS.workdir, "distil"))
    return 0


def cmd_distil_search(args: list[str]) -> int:
    from nasjax.search.autodistil import run_distil_search

    cfg = _need("config", FLAGS.config, "distil-search")
    out = run_distil_search(cfg, _need("workdir", FLAGS.workdir, "distil-search"))
    print("wrote " + ", ".join(out["files"]))
    return 0


COMMANDS = {
    "search": cmd_search,
    "lts-validate": cmd_lts_validate,
    "results": cmd_results,
    "train": cmd_train,
    "eval": cmd_eval,
    "describe": cmd_describe,
    "finetune": cmd_finetune,
    "data": cmd_data,
    "distil": cmd_distil,
    "distil-search": cmd_distil_search,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command = argv[1]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; commands: {', '.join(COMMANDS)}\n{USAGE}", file=sys.stderr)
        return EXIT_ERROR
    # config_flags needs --config=FILE before any --config.KEY override; accept any order.
    rest = argv[2:]
    rest = [a for a in rest if a.startswith("--config=")] + [a for a in rest if not a.startswith("--config=")]
    sys.argv = [argv[0], command] + rest  # config_flags also reads sys.argv
    try:
        positional = FLAGS([f"nasjax {command}"] + rest)[1:]
    except (flags.Error, KeyError, AttributeError, ValueError) as e:
        print(f"error: {_flag_error_text(e)}", file=sys.stderr)
        return EXIT_ERROR
    from nasjax.errors import USER_ERRORS

    try:
        return COMMANDS[command](positional)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\naborted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _flag_error_text(e: Exception) -> str:
    text = str(e)
    # config_flags wraps a misspelt key in a long message; keep the part naming the key.
    if "Did you mean" in text or "does not exist" in text:
        first = text.split(". Other fields present")[0]
        hint = text[text.find("Did you mean") :] if "Did you mean" in text else ""
        return f"{first.strip()} {hint.strip()}".strip().strip("'\"")
    return text


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
