"""The kernel library: every door svcproxy opens into the kernel, in one place.

Datapath and node plugins (ipvs, iptables, metallb, conntrack, the sysctl
store) reach the kernel only through these modules; nothing else under core/
or plugins/ opens a netlink socket, calls setns or runs a kernel tool. Each
door works in the host or inside a network namespace (tests, benchmarks and
the demo use one as the "node"), and has an in-memory fake in `fakes.py` that
the reconcilers' unit tests use.

    netns.py      enter a network namespace on the calling thread; open a socket there;
                  read /proc as a namespace sees it
    tools.py      the tool runner (iptables-save/-restore, ipset, conntrack, modprobe)
    netlink.py    one netlink transport: sockets, batches acked on refusals and the
                  last message only, attribute packing and walking
    ipvs.py       IPVS generic netlink on that transport: virtual/real servers, batched
                  writes, dumps, timeouts; the functional probe
    rtnl.py       rtnetlink on that transport: links (kube-ipvs0) and their addresses
    ipset.py      ipset over nfnetlink on that transport: grouped member writes, dumps
    iptables.py   iptables save / restore / parse, both backends, restore input
    conntrack.py  conntrack entry deletion; table usage
    sysctl.py     kernel settings written with their previous values recorded
    fakes.py      in-memory fakes of the doors the reconcilers use
"""
