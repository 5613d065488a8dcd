"""Create the classifier's MLflow user once (the compose service `mlflow-init`, and the tests).

An admin (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) creates the user named by
IMGCLS_READER_USERNAME with the password IMGCLS_READER_PASSWORD on the basic-auth server at
MLFLOW_TRACKING_URI. It may only read: the server's default_permission is READ
(docker/mlflow/basic_auth.ini) and it is granted nothing more. Run again, it leaves an
existing user as it is. Secrets come from the environment, never from arguments.
"""

from __future__ import annotations

import os
import sys

from mlflow.exceptions import MlflowException
from mlflow.server.auth.client import AuthServiceClient


def main() -> int:
    client = AuthServiceClient(os.environ["MLFLOW_TRACKING_URI"])
    username = os.environ["IMGCLS_READER_USERNAME"]
    try:
        client.get_user(username)
        print(f"MLflow user {username!r} exists; left as it is")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_user(username, os.environ["IMGCLS_READER_PASSWORD"])
        print(f"MLflow user {username!r} created (read-only: default_permission READ)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
