//! Bringing up the guest's interfaces without any tool from the image
//! (a minimal Debian has neither `ip` nor a DHCP client): ioctls only.

use std::io;

pub struct Ipv4 {
    pub addr: [u8; 4],
    pub mask: [u8; 4],
    pub gateway: [u8; 4],
}

/// QEMU's user-mode network: the guest is 10.0.2.15, the gateway 10.0.2.2,
/// the DNS forwarder 10.0.2.3.
pub const USER_NET: Ipv4 = Ipv4 {
    addr: [10, 0, 2, 15],
    mask: [255, 255, 255, 0],
    gateway: [10, 0, 2, 2],
};

fn sockaddr(ip: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is the
    // conversion the socket API expects.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    r
}

fn ioctl(fd: i32, req: libc::c_ulong, arg: *mut libc::c_void, what: &str) -> io::Result<()> {
    // SAFETY: `arg` points to the struct the request expects.
    if unsafe { libc::ioctl(fd, req as _, arg) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// Brings `name` up, with an address and a default route when given.
pub fn up(name: &str, conf: Option<Ipv4>) -> io::Result<()> {
    // SAFETY: a plain socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let res = (|| {
        if let Some(c) = &conf {
            let mut r = ifreq(name);
            r.ifr_ifru.ifru_addr = sockaddr(c.addr);
            ioctl(
                fd,
                libc::SIOCSIFADDR,
                (&mut r as *mut libc::ifreq).cast(),
                "set address",
            )?;
            let mut r = ifreq(name);
            r.ifr_ifru.ifru_netmask = sockaddr(c.mask);
            ioctl(
                fd,
                libc::SIOCSIFNETMASK,
                (&mut r as *mut libc::ifreq).cast(),
                "set netmask",
            )?;
        }
        let mut r = ifreq(name);
        ioctl(
            fd,
            libc::SIOCGIFFLAGS,
            (&mut r as *mut libc::ifreq).cast(),
            "get flags",
        )?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { r.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        ioctl(
            fd,
            libc::SIOCSIFFLAGS,
            (&mut r as *mut libc::ifreq).cast(),
            &format!("bring {name} up"),
        )?;
        if let Some(c) = &conf {
            // SAFETY: rtentry is plain data; all zeroes is a valid value.
            let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
            rt.rt_dst = sockaddr([0, 0, 0, 0]);
            rt.rt_genmask = sockaddr([0, 0, 0, 0]);
            rt.rt_gateway = sockaddr(c.gateway);
            rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
            ioctl(
                fd,
                libc::SIOCADDRT,
                (&mut rt as *mut libc::rtentry).cast(),
                "add the default route",
            )?;
        }
        Ok(())
    })();
    // SAFETY: closing the socket we opened.
    unsafe { libc::close(fd) };
    res
}

/// The host's network variables as a guest needs them: a proxy on the
/// host's loopback is the user-mode gateway from inside.
pub fn guest_env(vars: Vec<(String, String)>) -> Vec<(String, String)> {
    vars.into_iter()
        .map(|(k, v)| {
            if k.eq_ignore_ascii_case("no_proxy") {
                return (k, v);
            }
            let gw = "10.0.2.2";
            let v = ["127.0.0.1", "localhost", "[::1]"].iter().fold(v, |v, lo| {
                v.replace(&format!("://{lo}"), &format!("://{gw}"))
            });
            (k, v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_proxy_on_the_hosts_loopback_is_the_gateway_in_the_guest() {
        let vars = super::guest_env(vec![
            ("https_proxy".into(), "http://127.0.0.1:3128".into()),
            ("HTTP_PROXY".into(), "http://proxy.corp:8080".into()),
            ("no_proxy".into(), "localhost,127.0.0.1".into()),
        ]);
        assert_eq!(vars[0].1, "http://10.0.2.2:3128");
        assert_eq!(vars[1].1, "http://proxy.corp:8080");
        assert_eq!(vars[2].1, "localhost,127.0.0.1");
    }
}
