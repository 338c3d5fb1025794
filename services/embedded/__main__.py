"""python -m services.embedded: every service in one process, each on its own port, one shared runtime."""

from services.core.runtime import run_many
from services.datagen.service import DatagenSettings
from services.datagen.servicer import build as datagen
from services.evaluation.service import EvaluationSettings
from services.evaluation.servicer import build as evaluation
from services.merging.service import MergingSettings
from services.merging.servicer import build as merging
from services.pipeline.service import PipelineSettings
from services.pipeline.servicer import build as pipeline
from services.quantization.service import QuantizationSettings
from services.quantization.servicer import build as quantization
from services.registry.service import RegistrySettings
from services.registry.servicer import build as registry
from services.serving.service import ServingSettings
from services.serving.servicer import build as serving
from services.training.service import TrainingSettings
from services.training.servicer import build as training

SERVICES = [
    (RegistrySettings, registry), (DatagenSettings, datagen), (TrainingSettings, training),
    (MergingSettings, merging), (QuantizationSettings, quantization), (EvaluationSettings, evaluation),
    (ServingSettings, serving), (PipelineSettings, pipeline),
]

if __name__ == "__main__":
    run_many([(settings_cls(), build) for settings_cls, build in SERVICES])
