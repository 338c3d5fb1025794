"""python -m services.registry: serve the registry until SIGTERM."""

from services.core.runtime import run_service
from services.registry.service import RegistrySettings
from services.registry.servicer import build

if __name__ == "__main__":
    run_service(RegistrySettings(), build)
