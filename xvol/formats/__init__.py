"""The file formats xvol writes and reads, one module each, each with its version constant.

- :mod:`xvol.formats.checkpoint`: the training checkpoint (``KIND`` "xvol.train",
  ``FORMAT_VERSION``): save_checkpoint / load_checkpoint.
- :mod:`xvol.formats.deploy`: the deploy checkpoint (deploy.safetensors + deploy.json,
  ``DEPLOY_FORMAT_VERSION``, integrity hash): write_deploy_checkpoint / load_deploy_checkpoint.
- :mod:`xvol.formats.record`: the eval record (``RECORD_SCHEMA_VERSION``): validate_record,
  record_name, write_record / read_record.
- :mod:`xvol.formats.files`: the one atomic writer all of them (and every other in-place write)
  use, and sha256_file.

These modules read and write bytes and check them; building a network from what they read is
the caller's (xvol.tools_common.load_model). They import neither xvol.engine nor xvol.cli.
"""
