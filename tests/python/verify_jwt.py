"""Verifies a keyseal-minted JWT with PyJWT (a library nobody here wrote).

usage: verify_jwt.py JWKS_FILE TOKEN_FILE  -> prints the claims as JSON, exit 0
"""
import json
import sys

import jwt

jwks = json.load(open(sys.argv[1]))
token = open(sys.argv[2]).read().strip()
kid = jwt.get_unverified_header(token)["kid"]
jwk = next(k for k in jwks["keys"] if k["kid"] == kid)
key = jwt.PyJWK(jwk)
claims = jwt.decode(
    token,
    key.key,
    algorithms=[jwk["alg"]],
    issuer="keyseal",
    options={"require": ["exp", "iat", "sub", "iss"]},
)
print(json.dumps(claims))
