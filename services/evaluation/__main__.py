"""python -m services.evaluation: serve the evaluation service until SIGTERM."""

from services.core.runtime import run_service
from services.evaluation.service import EvaluationSettings
from services.evaluation.servicer import build

if __name__ == "__main__":
    run_service(EvaluationSettings(), build)
