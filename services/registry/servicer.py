"""RegistryService over gRPC: proto <-> domain conversion only."""

from __future__ import annotations

from services.core import convert
from services.core.job_api import JobSurfaceServicer
from services.core.runtime import Runtime
from services.core.server import Registration, check_enums
from services.core.specs import parse
from services.core.uploads import Chunk, UploadStatus
from services.gen.tunery.v1 import common_pb2 as pb
from services.gen.tunery.v1 import registry_pb2, registry_pb2_grpc
from services.registry.service import RegistryService, RegistrySettings
from services.registry.spec import ImportDatasetSpec, ImportModelSpec

FORMAT_NAMES = {
    pb.DATASET_FORMAT_UNSPECIFIED: "auto", pb.DATASET_FORMAT_ALPACA: "alpaca", pb.DATASET_FORMAT_CHAT: "chat",
    pb.DATASET_FORMAT_SHAREGPT: "sharegpt", pb.DATASET_FORMAT_COMPLETION: "completion",
    pb.DATASET_FORMAT_PREFERENCE: "preference",
}


class RegistryServicer(JobSurfaceServicer, registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, service: RegistryService):
        self.svc = service
        self.jobs = service.jobs

    async def ImportModel(self, request: registry_pb2.ImportModelRequest, context) -> pb.Job:
        s = request.spec
        spec = parse(ImportModelSpec, {"source": s.source, "name": s.name, "revision": s.revision,
                                       "allow_trust_remote_code": s.allow_trust_remote_code,
                                       "uploaded_from": s.uploaded_from})
        return convert.job_to_pb(await self.svc.import_model(spec, convert.options_from_pb(request.options)))

    async def ImportDataset(self, request: registry_pb2.ImportDatasetRequest, context) -> pb.Job:
        s = request.spec
        spec = parse(ImportDatasetSpec, {"source": s.source, "name": s.name, "uploaded_from": s.uploaded_from,
                                         "format": convert.enum_name(FORMAT_NAMES, s.format, "spec.format")})
        return convert.job_to_pb(await self.svc.import_dataset(spec, convert.options_from_pb(request.options)))

    async def ListArtifacts(self, request: registry_pb2.ListArtifactsRequest, context):
        page, nxt = await self.svc.list(convert.PB_TO_KIND.get(request.kind, ""), request.name,
                                        request.page_size, request.page_token)
        return registry_pb2.ListArtifactsResponse(artifacts=[convert.manifest_to_pb(m) for m in page],
                                                  next_page_token=nxt)

    async def GetArtifact(self, request: registry_pb2.GetArtifactRequest, context) -> pb.Artifact:
        return convert.manifest_to_pb(await self.svc.get(request.id))

    async def GetLineage(self, request: registry_pb2.GetLineageRequest, context):
        chain = await self.svc.lineage(request.id, request.max_depth)
        return registry_pb2.GetLineageResponse(artifacts=[convert.manifest_to_pb(m) for m in chain])

    async def DownloadFile(self, request: registry_pb2.DownloadFileRequest, context):
        async for entry, offset, data in self.svc.download(request.id, request.path):
            yield registry_pb2.FileChunk(data=data, offset=offset, size=entry.size, sha256=entry.sha256)

    async def StatUpload(self, request: registry_pb2.StatUploadRequest, context) -> registry_pb2.UploadStatus:
        return status_to_pb(await self.svc.stat_upload(request.sha256, request.size))

    async def UploadFile(self, request_iterator, context) -> registry_pb2.UploadStatus:
        async def chunks():
            async for c in request_iterator:
                check_enums(c)
                yield Chunk(sha256=c.sha256, size=c.size, offset=c.offset, data=c.data)

        return status_to_pb(await self.svc.upload(chunks()))

    async def DeleteArtifact(self, request: registry_pb2.DeleteArtifactRequest, context):
        return registry_pb2.DeleteArtifactResponse(id=(await self.svc.delete(request.id)).id)


def status_to_pb(st: UploadStatus) -> registry_pb2.UploadStatus:
    return registry_pb2.UploadStatus(sha256=st.sha256, size=st.size, stored=st.stored, received_bytes=st.received)


def build(runtime: Runtime, settings: RegistrySettings) -> Registration:
    service = RegistryService(runtime.artifacts, runtime.runner, settings)
    return Registration(registry_pb2_grpc.add_RegistryServiceServicer_to_server, RegistryServicer(service),
                        "tunery.v1.RegistryService")
