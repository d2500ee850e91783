"""The twistd plugin: ``twistd kvd --role ROLE``. Lazy, so ``twistd --help`` imports nothing of kvd."""

from twisted.application.service import ServiceMaker

kvd = ServiceMaker(
    "kvd",
    "kvd.tap",
    "kvd: a distributed key-value store (roles: node, registry, gateway, dev)",
    "kvd",
)
