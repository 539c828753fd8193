"""Network plumbing on this host or a node, via pyroute2: ``hostlab`` (netns
"nodes"), ``pod`` (a Kata-shaped pod network: Calico-style veth, tcfilter redirect),
``listening`` (the one "is it listening" reader of /proc/net/tcp).
"""
