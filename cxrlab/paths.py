"""Where each stage reads and writes; `dvc.yaml` declares the same paths."""

from pathlib import Path

DATA = Path("data")
RAW = DATA / "raw"  # download: the dataset as downloaded
DOWNLOADS = DATA / ".downloads"  # download: archives in flight, kept to resume
SPLIT = DATA / "split"  # split: train.csv, test.csv
TRAIN_CSV = SPLIT / "train.csv"
TEST_CSV = SPLIT / "test.csv"
DATASET = DATA / "dataset"  # prepare: <split>/<class>/<file>
PREPARED = DATA / "prepared"  # preprocess: <split>.npy + <split>.csv + meta.json

MODELS = Path("models")  # train: <variant>/seed_<seed>/best.pt, last.pt (with data.folds: seed_<seed>/fold_<f>/)
METRICS = Path("metrics")
# Metrics files (`metrics:` in dvc.yaml) hold headline numbers only, for `dvc exp show`;
# the *_report.json beside them hold everything else.
SPLIT_METRICS = METRICS / "split.json"
SPLIT_REPORT = METRICS / "split_report.json"
FLOPS = METRICS / "flops.json"
FLOPS_REPORT = METRICS / "flops_report.json"
COMPARISON = METRICS / "comparison.json"
COMPARISON_REPORT = METRICS / "comparison_report.json"
COMPARISON_TABLE = METRICS / "comparison.md"
PLOTS = Path("plots")
EXPLANATIONS = Path("explanations")  # explain: <variant>/gallery.png, gallery.csv
EXPORTS = Path("exports")  # export: <variant>/seed_<seed>.onnx + seed_<seed>.json (its contract)
TRAIN_STATE = Path(".train-state")  # train: runs in progress (not a DVC output)


def served_checkpoints(variant: str, seed: int, which: str) -> list[Path]:
    """The checkpoints predict, the page and explain load: the seed's one, or with data.folds each fold's
    (their mean probability is the model, as evaluate scores it)."""
    path = checkpoint(variant, seed, which)
    folds = sorted((MODELS / variant / f"seed_{seed}").glob(f"fold_*/{which}.pt"),
                   key=lambda p: int(p.parent.name.split("_")[1]))
    return folds if not path.is_file() and folds else [path]


def model_dir(variant: str) -> Path:
    return MODELS / variant


def _fold(folder: Path, fold: int | None) -> Path:
    """`folder` itself without folds (data.folds: null), else its `fold_<f>` subfolder."""
    return folder if fold is None else folder / f"fold_{fold}"


def checkpoint(variant: str, seed: int, which: str, fold: int | None = None) -> Path:
    """`which` is best (the epoch chosen on validation) or last; `fold`: the model that held out fold `fold`."""
    return _fold(MODELS / variant / f"seed_{seed}", fold) / f"{which}.pt"


def train_dir(variant: str) -> Path:
    """A variant's training headline (metrics.json), summary (report.json) and per-seed logs (seeds/)."""
    return METRICS / "train" / variant


def train_log(variant: str, seed: int, fold: int | None = None) -> Path:
    """DVCLive folder of one training run: metrics.json, plots/metrics/**/*.tsv."""
    return _fold(METRICS / "train" / variant / "seeds" / f"seed_{seed}", fold)


def run_logs(variant: str, seed: int) -> list[Path]:
    """The DVCLive folders of a seed: its one run's, or with data.folds each fold's, in fold order."""
    folder = train_log(variant, seed)
    folds = sorted(folder.glob("fold_*"), key=lambda p: int(p.name.split("_")[1]))
    return folds or [folder]


def train_state(variant: str, seed: int, fold: int | None = None) -> Path:
    """A seed's (with data.folds, a seed and fold's) run in progress: best.pt, resume.pt (weights,
    optimiser and schedule state) and its log.
    Moved into models/ and metrics/ only when the run completes; `runtime.resume`
    continues from here after an interruption."""
    return _fold(TRAIN_STATE / variant / f"seed_{seed}", fold)


def finished_record(variant: str, seed: int, fold: int | None = None) -> Path:
    """A run of an unfinished train stage that did complete: its summary and fingerprint, so that
    `runtime.resume` keeps it rather than training it again. Removed when the stage completes."""
    name = f"seed_{seed}" + (f"_fold_{fold}" if fold is not None else "")
    return TRAIN_STATE / variant / "finished" / f"{name}.json"


def eval_dir(variant: str) -> Path:
    """A variant's test results: metrics.json (headline), report.json, predictions.csv, plots/sklearn/*.json."""
    return METRICS / "evaluate" / variant


def explain_dir(variant: str) -> Path:
    """A variant's Grad-CAM gallery over test images: gallery.png and gallery.csv."""
    return EXPLANATIONS / variant


EXTERNAL_DATA = DATA / "external"  # external_data@<set>: images.npy, images.csv, meta.json
EXTERNAL = METRICS / "external"  # external@<model>-<set>: <set>/<model>/ as evaluate's, plus roc.csv
CARDS = Path("cards")  # card@<variant>: <variant>.md


def external_data(name: str) -> Path:
    """An external test set, preprocessed like the internal one (never split)."""
    return EXTERNAL_DATA / name


def external_dir(name: str, model: str) -> Path:
    """A model's (variant's or ensemble's) results on external set `name`."""
    return EXTERNAL / name / model
def export_dir(variant: str) -> Path:
    """A variant's deployable models: seed_<seed>.onnx, each with its preprocessing contract seed_<seed>.json."""
    return EXPORTS / variant
