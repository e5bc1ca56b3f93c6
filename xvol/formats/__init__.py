"""The file formats xvol writes and reads, one module each, each with its version constant.

- :mod:`xvol.formats.checkpoint`: the training checkpoint (``KIND`` "xvol.train",
  ``FORMAT_VERSION``): save_checkpoint / load_checkpoint.
- :mod:`xvol.formats.deploy`: the deploy checkpoint (deploy.safetensors + deploy.json,
  ``DEPLOY_FORMAT_VERSION``, integrity hash): write_deploy_checkpoint / load_deploy_checkpoint.
- :mod:`xvol.formats.record`: the eval record (``RECORD_SCHEMA_VERSION``): validate_record,
  record_name, write_record / read_record.
- :mod:`xvol.formats.files`: the one atomic writer all of them (and every other in-place write)
  use, and sha256_file.
- :mod:`xvol.formats.load`: a network from either checkpoint kind (load_model), rebuilt from
  the validated model spec, and load_state_dict_strict.
- :mod:`xvol.formats.provenance`: git_revision, the ``git`` every file above records.

The format modules read and write bytes and check them; load builds the network from what they
read. They import neither xvol.engine nor xvol.cli.
"""
