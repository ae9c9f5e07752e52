"""An ``Authorizer`` for the test jupyter server whose policy a test can switch while it runs.

The policy is the first word of the file named by ``$NBC_TEST_AUTHZ``: ``allow`` (everything),
``read`` (only action ``read``) or ``deny`` (nothing). Every question asked is appended to that
file's ``.log`` sibling as ``action resource``, so a test can see what was asked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jupyter_server.auth.authorizer import Authorizer


class SwitchableAuthorizer(Authorizer):  # type: ignore[misc]  # jupyter_server is untyped
    """Allows what the policy file says (see the module docstring)."""

    def is_authorized(self, handler: Any, user: Any, action: str, resource: str) -> bool:
        path = Path(os.environ["NBC_TEST_AUTHZ"])
        with open(path.with_suffix(".log"), "a") as log:
            log.write(f"{action} {resource}\n")
        policy = path.read_text().split()[0]
        return policy == "allow" or (policy == "read" and action == "read")
