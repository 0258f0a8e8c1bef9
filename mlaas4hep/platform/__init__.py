"""Platform core: spec, ROOT reading, specs and flattening, storage, auth, jobs, cluster."""
