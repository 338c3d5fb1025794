// An outside Node.js client of the Tunery API: @grpc/grpc-js + @grpc/proto-loader load protos/ at run time (no
// generated code), then ListArtifacts and a WatchJob stream on the registry under the protos' own names.
//   node node_client.js PROTOS_DIR ADDRESS TOKEN JOB_ID
// Prints one JSON line per result; exits non-zero on any error.
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [protos, address, token, jobId] = process.argv.slice(2);
const definition = protoLoader.loadSync("tunery/v1/registry.proto", {
  includeDirs: [protos], keepCase: true, longs: String, enums: String, defaults: true,
});
const tunery = grpc.loadPackageDefinition(definition).tunery.v1;
const client = new tunery.RegistryService(address, grpc.credentials.createInsecure());
const metadata = new grpc.Metadata();
metadata.set("authorization", `Bearer ${token}`);
const fail = (what, err) => { console.error(`${what}: ${err.code} ${err.details || err.message}`); process.exit(1); };

client.ListArtifacts({ page_size: 50 }, metadata, { deadline: Date.now() + 30000 }, (err, reply) => {
  if (err) fail("ListArtifacts", err);
  console.log(JSON.stringify({ rpc: "ListArtifacts", path: tunery.RegistryService.service.ListArtifacts.path,
                               artifacts: reply.artifacts.map((a) => a.id) }));
  const events = [];
  const stream = client.WatchJob({ job_id: jobId }, metadata);
  stream.on("data", (e) => events.push({ cursor: e.cursor, type: e.type, text: e.text }));
  stream.on("error", (e) => fail("WatchJob", e));
  stream.on("end", () => {
    console.log(JSON.stringify({ rpc: "WatchJob", path: tunery.RegistryService.service.WatchJob.path, events }));
    client.close();
  });
});
