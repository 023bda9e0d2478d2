"""A ServiceAccount issuer for unit tests: a signing key, its JWKS as the apiserver serves it
at /openid/v1/jwks, and tokens signed with it (or forged) as kubelet-projected ones look."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm


@dataclass
class Issuer:
    kid: str = "issuer-key-1"
    # EC P-256: a key is made in microseconds, and the apiserver signs with ES256 as well as RS256.
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def jwks(self) -> dict[str, Any]:
        public = ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {"keys": [{**public, "kid": self.kid, "alg": "ES256", "use": "sig"}]}

    def token(self, *, sub: str, aud: str = "restic-manager", expires_in: float = 600.0,
              kid: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": "https://kubernetes.default.svc", "sub": sub, "aud": [aud], "iat": now,
                "nbf": now, "exp": now + int(expires_in), **claims}
        return jwt.encode(body, self.key, algorithm="ES256", headers={"kid": kid or self.kid})
