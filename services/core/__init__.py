"""The one shared runtime: settings, errors, logs, the artifact store, the job runner and the gRPC server factory."""
