"""Stream processing: the Faust worker, publishing SDK, dataset loaders and replay."""
