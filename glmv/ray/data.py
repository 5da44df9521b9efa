"""`glmv extract --ray` at scale on Ray Data: one engine per actor, one JSONL file written by the driver.

    glmv extract --ray scans/ --schema invoice --out results.jsonl --num-actors 8 [--ray-address auto]

The same flags, output and resume semantics as `glmv extract` (`glmv.tasks.batch_extract`): every
input file gets exactly one line in `--out`, files that already have a line are skipped (with
`--retry-errors`, error lines are dropped and run again), a line cut off by a crash is dropped
before the run appends, and the exit status is 0 when every file has data, 1 when some got
error lines, 2 for bad arguments. `glmv extract` adds the flags of this module
(`add_ray_extract_arguments`, plain argparse: `glmv extract --help` needs no Ray) and hands a
`--ray` run to `run_extract_ray`.

How it runs: the driver lists the files still to do and hands them to Ray Data as a dataset of
paths; `map_batches` runs them through a fixed pool of `--num-actors` actors, each loading the
generation service once and keeping it across batches (`glmv.ray.extract_worker.DocumentExtractor`,
one GPU per actor when the cluster has GPUs) and extracting `--batch-size` documents at a time
with all of them in flight in its engine. Records stream back to the driver as batches finish;
the driver alone appends to the output file, one complete, flushed line per file (a file's line
is never written twice, even if Ray runs a batch again after an actor failed). Killing the driver
loses only the batches in flight: the next run skips every file already written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from glmv.ray import require_ray

__all__ = ["add_ray_extract_arguments", "ray_flags_given", "run_extract_ray"]

DEFAULT_BATCH_SIZE = 16
DEFAULT_NUM_CPUS_PER_ACTOR = 1.0

# The flags of a --ray run (dest -> flag); none has a default, so a given one is known.
RAY_EXTRACT_FLAGS = {
    "ray_address": "--ray-address",
    "ray_num_cpus": "--ray-num-cpus",
    "num_actors": "--num-actors",
    "num_gpus_per_actor": "--num-gpus-per-actor",
    "num_cpus_per_actor": "--num-cpus-per-actor",
    "batch_size": "--batch-size",
}


class ExtractActor:
    """The Ray Data callable class: one `DocumentExtractor` (one service and engine) per actor."""

    def __init__(self, job: Any) -> None:
        from glmv.ray.extract_worker import DocumentExtractor

        self.extractor = DocumentExtractor(job)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        sources = [str(s) for s in batch["source"]]
        records = self.extractor.extract(sources)
        return {"record": [json.dumps(r, ensure_ascii=False) for r in records]}

    def __del__(self) -> None:
        # Ray drops the actor when the dataset is done: stop the engine with it.
        extractor = getattr(self, "extractor", None)
        if extractor is not None:
            extractor.close()


def add_ray_extract_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `glmv extract --ray` (the `glmv extract` flags are the command's own)."""
    group = parser.add_argument_group("ray", "with --ray: the run on Ray Data, one engine per actor")
    group.add_argument(
        "--ray-address",
        help="Ray cluster to use: 'auto' or HOST:PORT (default: $RAY_ADDRESS, else a new local instance)",
    )
    group.add_argument("--ray-num-cpus", type=float, help="CPUs of a Ray instance started here")
    group.add_argument("--num-actors", type=int, help="engines (actors); default: the cluster's GPUs, else 1")
    group.add_argument(
        "--num-gpus-per-actor", type=float, help="default: 1 when the cluster has GPUs, else 0"
    )
    group.add_argument(
        "--num-cpus-per-actor", type=float, help=f"default: {DEFAULT_NUM_CPUS_PER_ACTOR:g}"
    )
    group.add_argument(
        "--batch-size", type=int, help=f"documents an actor extracts together (default: {DEFAULT_BATCH_SIZE})"
    )


def ray_flags_given(args: argparse.Namespace) -> list[str]:
    """The --ray flags set in `args` (a mistake without --ray: they would do nothing)."""
    return [flag for dest, flag in RAY_EXTRACT_FLAGS.items() if getattr(args, dest, None) is not None]


def _resources(args: argparse.Namespace) -> tuple[int, float]:
    import ray

    gpus_in_cluster = int(ray.cluster_resources().get("GPU", 0))
    gpus = (
        args.num_gpus_per_actor if args.num_gpus_per_actor is not None else (1.0 if gpus_in_cluster else 0.0)
    )
    actors = args.num_actors
    if actors is None:
        actors = max(1, int(gpus_in_cluster // gpus)) if gpus else 1
    return actors, gpus


def run_extract_ray(args: argparse.Namespace) -> int:
    """Exit status: 0 all files extracted, 1 some files got error lines. A bad argument is a
    `ConfigError` (status 2 from `glmv extract`), raised before Ray starts."""
    require_ray()
    from glmv.errors import ConfigError, GlmvError
    from glmv.ray.extract_worker import ExtractJob
    from glmv.tasks.batch_extract import RecordWriter, load_done, spec_of
    from glmv.tasks.documents import collect_files, display_path, resume_key

    if args.server:
        raise ConfigError("--server does not apply with --ray: the actors run the model; leave one of them out")
    batch_size = args.batch_size if args.batch_size is not None else DEFAULT_BATCH_SIZE
    cpus_per_actor = args.num_cpus_per_actor if args.num_cpus_per_actor is not None else DEFAULT_NUM_CPUS_PER_ACTOR
    if batch_size < 1 or (args.num_actors is not None and args.num_actors < 1):
        raise ConfigError("--batch-size and --num-actors must be >= 1")
    job = ExtractJob.from_args(args)  # a bad --schema: ConfigError
    try:  # a schema the grammar cannot enforce fails here, once, rather than in every actor
        spec_of(job.label, job.schema, job.instructions)
    except GlmvError as exc:
        raise ConfigError(f"--schema: {exc.message}") from None
    files = collect_files(args.files)
    done = load_done(args.out, retry_errors=args.retry_errors)
    done_keys = {resume_key(source) for source in done}
    todo = [str(p) for p in files if resume_key(p) not in done_keys]
    if len(files) != len(todo):
        print(
            f"{len(files) - len(todo)} of {len(files)} files already in {args.out}; {len(todo)} to do",
            file=sys.stderr,
        )
    if not todo:
        return 0

    import ray
    from tqdm import tqdm

    # No address: RAY_ADDRESS when set, else a new local instance (never a stray cluster found on disk).
    address = args.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    init: dict[str, Any] = {"address": address, "include_dashboard": False, "log_to_driver": False}
    if address == "local" and args.ray_num_cpus is not None:
        init["num_cpus"] = args.ray_num_cpus
    ray.init(**init)
    try:
        actors, gpus = _resources(args)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # glmv's own bar counts files
        blocks = max(1, min(len(todo) // batch_size + (len(todo) % batch_size > 0), 100_000))
        dataset = ray.data.from_items([{"source": s} for s in todo], override_num_blocks=blocks).map_batches(
            ExtractActor,
            fn_constructor_kwargs={"job": job},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor,
            num_gpus=gpus,
        )
        wanted = {display_path(s) for s in todo}  # records name their file as `glmv extract` does
        written: set[str] = set()
        failures = 0
        writer = RecordWriter(args.out)
        try:
            with tqdm(total=len(todo), desc="extract", unit="file", disable=args.no_progress) as bar:
                for row in dataset.iter_rows():
                    record = json.loads(row["record"])
                    source = record.get("source")
                    if source not in wanted or source in written:  # a batch Ray ran twice
                        continue
                    written.add(source)
                    failures += "error" in record
                    writer.write(record)
                    bar.update(1)
        finally:
            writer.close()
    finally:
        ray.shutdown()
    missing = len(wanted) - len(written)
    if missing:
        raise GlmvError(f"{missing} files got no result; run again to finish them")
    return 1 if failures else 0


if __name__ == "__main__":
    print("python -m glmv.ray.data: error: run `glmv extract --ray ...` instead (the same flags)", file=sys.stderr)
    raise SystemExit(2)
