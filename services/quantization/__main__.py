"""python -m services.quantization: serve the quantization service until SIGTERM."""

from services.core.runtime import run_service
from services.quantization.service import QuantizationSettings
from services.quantization.servicer import build

if __name__ == "__main__":
    run_service(QuantizationSettings(), build)
