"""Why an object store failed, said in one line that names what to change.

pyarrow.fs hands on the AWS or Google SDK's text ("AWS Error ACCESS_DENIED during HeadBucket
operation: No response body."). `explain` sorts it into the causes a user can act on: the
endpoint does not answer, it answers but is no object store, the credentials are refused; and
names the flag, variable or file to change. `credentials` says where the SDK finds credentials,
in the SDK's own search order, so that "access denied" names the ones that were refused.
"""

from __future__ import annotations

import os
from pathlib import Path

# Substrings of the SDKs' error texts, by cause (AWS error codes, google-cloud-cpp status codes).
DENIED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY", "SIGNATURE", "TOKEN", "UNRECOGNIZED_CLIENT", "REQUEST_EXPIRED",
          "status 401", "status 403", "PERMISSION_DENIED", "UNAUTHENTICATED", "OAuth2")
UNREACHABLE = ("NETWORK_CONNECTION", "curlCode", "CURL error", "Could not connect", "Could not resolve",
               "Timeout was reached", "UNAVAILABLE")
NOT_A_STORE = ("RESOURCE_NOT_FOUND",)  # a 404 without an S3 error body: a web server, not an object store
STALLED = ("got no answer in",)  # a gs:// request abandoned at its deadline (engine/storage.py, Stalled)
TLS = ("SSL", "TLS")  # https spoken to a plain-http server (or a certificate refused)
DETAIL_CHARS = 300  # of the SDK's text kept in a message (google-cloud-cpp's runs to 1,000+ characters)


def check_endpoint(endpoint: str | None) -> str | None:
    """Why an --s3-endpoint value cannot name a server (None when it can): a host and port, with
    http:// or https:// or neither (then https), and no path, which the SDK would ignore."""
    if not endpoint:
        return None
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "https", endpoint
    if scheme not in ("http", "https") or not rest.rstrip("/") or any(c in rest.rstrip("/") for c in "/ ?#@"):
        return f"--s3-endpoint {endpoint}: give the server as http://host:port (or https://host:port), without a path"
    return None


def one_line(exc: BaseException) -> str:
    """An SDK's error message on one line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def where(scheme: str, endpoint: str | None) -> str:
    """The server a store's requests go to, as the user set it."""
    if endpoint:
        return f"--s3-endpoint {endpoint}"
    return "AWS S3 (no --s3-endpoint given)" if scheme == "s3" else "Google Cloud Storage (no --s3-endpoint given)"


def credentials(scheme: str, anonymous: bool = False, env=os.environ) -> str:
    """Where the SDK takes this store's credentials from (named in an access-denied error)."""
    if anonymous:
        return "none (anonymous requests, as a GCS emulator at --s3-endpoint takes them)"
    return aws_credentials(env) if scheme == "s3" else gcs_credentials(env)


def aws_credentials(env=os.environ) -> str:
    """The AWS SDK's credential source: environment, then the shared files, then web identity or container."""
    key = env.get("AWS_ACCESS_KEY_ID")
    if key:
        return f"AWS_ACCESS_KEY_ID ...{key[-4:]} and AWS_SECRET_ACCESS_KEY from the environment"
    profile = env.get("AWS_PROFILE") or "default"
    for var, default in (("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), ("AWS_CONFIG_FILE", "~/.aws/config")):
        path = env.get(var) or default
        if Path(path).expanduser().is_file():
            return f"profile {profile} of {path} (AWS_PROFILE picks another)"
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return "the web identity token named by AWS_WEB_IDENTITY_TOKEN_FILE"
    if env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return "the container's credentials endpoint (AWS_CONTAINER_CREDENTIALS_*)"
    return ("none found (no AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, no ~/.aws/credentials; "
            "only a cloud instance's role could give them)")


def gcs_credentials(env=os.environ) -> str:
    """Google's application-default credential source: the key file, gcloud's login, the metadata server."""
    if env.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return f"the key file {env['GOOGLE_APPLICATION_CREDENTIALS']} (GOOGLE_APPLICATION_CREDENTIALS)"
    config = Path(env.get("CLOUDSDK_CONFIG") or "~/.config/gcloud").expanduser()
    if (config / "application_default_credentials.json").is_file():
        return f"gcloud's application-default login ({config}/application_default_credentials.json)"
    return ("none found (no GOOGLE_APPLICATION_CREDENTIALS, no `gcloud auth application-default login`; "
            "only a Google Cloud VM's metadata server could give them)")


def explain(exc: BaseException, what: str, scheme: str, endpoint: str | None, anonymous: bool = False) -> str:
    """One line for a failed request about `what` ("--output s3://b/p", "input s3://b/k"): its
    cause and the flag, variable or file to change first, then the SDK's own words."""
    text, server = one_line(exc), where(scheme, endpoint)
    detail = text if len(text) <= DETAIL_CHARS else text[:DETAIL_CHARS] + "..."
    if any(k in text for k in STALLED):  # its own text names the server, the request and the deadline
        return f"{what}: {text}; check that the server runs and answers, and the network to it"
    if any(k in text for k in DENIED):
        return (f"{what}: access refused by {server}; credentials: {credentials(scheme, anonymous)}; "
                f"give ones allowed to read and write there ({detail})")
    if any(k in text for k in TLS):
        return (f"{what}: no TLS connection to {server} (an address without http:// is reached over https); "
                f"write http://host:port for a plain-http server ({detail})")
    if any(k in text for k in UNREACHABLE):
        return f"{what}: cannot reach {server}; check the address in --s3-endpoint and that the server runs ({detail})"
    if any(k in text for k in NOT_A_STORE):
        return (f"{what}: {server} answers, but not as an object store (a 404 without an S3 error); "
                f"is --s3-endpoint the right address and port? ({detail})")
    return f"{what}: {detail} (server: {server}; credentials: {credentials(scheme, anonymous)})"
