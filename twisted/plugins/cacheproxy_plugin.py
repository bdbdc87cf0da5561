"""twistd plugin: ``twistd cacheproxy`` runs the caching proxy."""

from twisted.application.service import ServiceMaker

cacheproxy = ServiceMaker(
    "cacheproxy",
    "cacheproxy.service",
    "A caching HTTP forward proxy with a disk store.",
    "cacheproxy",
)
