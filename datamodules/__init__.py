"""SAKE data: schema, loader and checker, the SAKE-mini offline world, builder, DataModule."""
