"""Workdirs on local disk or Cloud Storage: the check every entry point runs before any work.

Checkpoints (Orbax), metrics.jsonl and TensorBoard events all go through `tf.io.gfile` /
Orbax's path layer, so a workdir may be a `gs://bucket/path`. What fails late and obscurely
there is credentials: TensorFlow's GCS client looks for them only at the first write (and on a
machine outside Google Cloud it then waits on the metadata server). `check_workdir` looks for
credentials first, naming what it looked for, then writes and deletes a probe file, so a bad
workdir stops a run before the tokenizer, the data or the model are built.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid


class WorkdirError(OSError):
  """The workdir cannot be written (the message names the path and the cause)."""


def gcs_credentials_source(environ: dict[str, str] | None = None,
                           home: str | None = None) -> str | None:
  """Where Google Cloud credentials would come from on this machine, or None.

  Checked in the order of Google's application-default-credentials lookup:
  GOOGLE_APPLICATION_CREDENTIALS (a file that must exist), gcloud's application default
  credentials file, then a Google Cloud VM (TPU VMs included: the metadata server).
  """
  env = os.environ if environ is None else environ
  path = env.get("GOOGLE_APPLICATION_CREDENTIALS")
  if path:
    return f"GOOGLE_APPLICATION_CREDENTIALS={path}" if os.path.isfile(path) else None
  config_dir = env.get("CLOUDSDK_CONFIG") or os.path.join(home or os.path.expanduser("~"),
                                                          ".config", "gcloud")
  adc = os.path.join(config_dir, "application_default_credentials.json")
  if os.path.isfile(adc):
    return adc
  if env.get("GCE_METADATA_HOST"):
    return f"GCE_METADATA_HOST={env['GCE_METADATA_HOST']}"
  try:
    with open("/sys/class/dmi/id/product_name") as f:
      if "Google" in f.read():
        return "the Google Cloud VM metadata server"
  except OSError:
    pass
  return None


def check_workdir(workdir: str, environ: dict[str, str] | None = None,
                  home: str | None = None, probe: bool = True) -> None:
  """Raises WorkdirError unless `workdir` (local or gs://) can be created and written."""
  if not workdir:
    raise WorkdirError("No workdir given (--workdir)")
  if workdir.startswith("gs://"):
    if gcs_credentials_source(environ, home) is None:
      raise WorkdirError(
          f"workdir {workdir}: no Google Cloud credentials on this machine "
          "(GOOGLE_APPLICATION_CREDENTIALS is unset or not a file, no application default "
          "credentials at ~/.config/gcloud/application_default_credentials.json, not a "
          "Google Cloud VM); run `gcloud auth application-default login` or set "
          "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file")
  elif workdir.startswith(("s3://", "hdfs://")) or "://" in workdir:
    raise WorkdirError(f"workdir {workdir}: only local paths and gs:// are supported")
  if not probe:
    return
  import tensorflow as tf
  name = f".write_probe_{socket.gethostname()}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
  path = os.path.join(workdir, name)
  try:
    tf.io.gfile.makedirs(workdir)
    with tf.io.gfile.GFile(path, "w") as f:
      f.write("ok")
    tf.io.gfile.remove(path)
  except Exception as e:  # noqa: BLE001 - tf raises many kinds; all mean "not writable"
    raise WorkdirError(f"workdir {workdir} is not writable from {socket.gethostname()}: "
                       f"{type(e).__name__}: {e}") from e


if __name__ == "__main__":
  # `python -m train.storage WORKDIR`: the probe launch/tpu_vm.py runs on every worker;
  # prints "writable" or the reason (last line).
  try:
    check_workdir(sys.argv[1])
  except WorkdirError as e:
    print(" ".join(str(e).split()))
    sys.exit(1)
  print("writable")
