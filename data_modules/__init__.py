"""LightningDataModules that stream prepared token shards (installed as ``jpeglm.data_modules``)."""
