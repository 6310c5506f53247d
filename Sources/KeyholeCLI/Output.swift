#if canImport(Glibc)
import Glibc
#endif
import KeyholePolicy

/// Unbuffered writes to the standard streams (so ordering with child output is kept).
enum Output {
    static func out(_ text: String) { write(1, text) }
    static func err(_ text: String) { write(2, text) }

    private static func write(_ fd: Int32, _ text: String) {
        var bytes = Array(text.utf8)
        if bytes.last != 0x0A { bytes.append(0x0A) }
        bytes.withUnsafeBytes { _ = FileBytes.writeAll(fd, $0) }
    }
}

enum ProcessEnvironmentValue {
    static func get(_ name: String) -> String? {
        guard let value = getenv(name) else { return nil }
        return String(cString: value)
    }
}
