"""The fine-tuning example's default run (embedded text, small hybrid) learns without overfitting: the eval loss
falls at every evaluation. It takes about 10 s of CPU time (one thread), well under the example's claim of a minute."""

import itertools
import sys

from helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "examples"))
import finetune  # noqa: E402  (examples/ is not a package)


def test_the_default_run_lowers_the_eval_loss_at_every_evaluation(tmp_path):
    trainer = finetune.main(["--output-dir", str(tmp_path)])
    evals = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evals) >= 4
    # (the run's end is evaluated twice, by the last eval step and by the example's own evaluate())
    assert all(later <= earlier + 1e-4 for earlier, later in itertools.pairwise(evals)), evals
    assert evals[-1] < 0.7 * evals[0], evals
