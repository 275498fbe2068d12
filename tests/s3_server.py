"""A local S3-protocol server for tests: moto's standalone server on 127.0.0.1, one per test session.

Code under test reaches it only through the standard AWS environment (``s3_environment``); the
server object itself is used by fixtures to create buckets.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import boto3
from moto.server import ThreadedMotoServer

TEST_REGION = "us-east-1"


def free_port() -> int:
    """A TCP port nobody listens on right now (on 127.0.0.1)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def s3_environment(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point botocore, s3fs and pyarrow (via our code) at ``endpoint``."""
    return {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": TEST_REGION,
        "AWS_DEFAULT_REGION": TEST_REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,  # ignore the developer's ~/.aws
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


# Variables that would send requests elsewhere or pick other credentials.
CONFLICTING_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                         "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


@dataclass
class S3TestServer:
    """A running ThreadedMotoServer and its endpoint URL."""

    server: ThreadedMotoServer
    endpoint: str

    @classmethod
    def start(cls) -> "S3TestServer":
        """Start a fresh server on a free port of 127.0.0.1 (quietly)."""
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        return cls(server, f"http://127.0.0.1:{port}")

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (3-63 chars, lowercase)."""
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name=TEST_REGION,
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=name)

    def stop(self) -> None:
        """Shut the server down."""
        self.server.stop()
