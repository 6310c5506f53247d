public import KeyholePolicy

#if canImport(Glibc)
import Glibc
#endif

/// The addresses this host (or network namespace) has on its interfaces.
public enum LocalAddresses {
    public static func all() -> [IPAddress] {
        var list: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&list) == 0, let first = list else { return [] }
        defer { freeifaddrs(list) }
        var addresses: [IPAddress] = []
        var cursor: UnsafeMutablePointer<ifaddrs>? = first
        while let entry = cursor {
            defer { cursor = entry.pointee.ifa_next }
            guard let raw = entry.pointee.ifa_addr else { continue }
            switch Int32(raw.pointee.sa_family) {
            case AF_INET:
                let v4 = UnsafeRawPointer(raw).load(as: sockaddr_in.self)
                addresses.append(.v4(UInt32(bigEndian: v4.sin_addr.s_addr)))
            case AF_INET6:
                var v6 = UnsafeRawPointer(raw).load(as: sockaddr_in6.self).sin6_addr
                addresses.append(IPAddress(v6Bytes: withUnsafeBytes(of: &v6) { Array($0) }))
            default:
                continue
            }
        }
        return addresses
    }
}
