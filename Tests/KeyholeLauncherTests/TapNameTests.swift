import KeyholeLauncher
import Testing

@Suite("TAP names")
struct TapNameTests {
    @Test(arguments: ["worker", "a", "a-very-long-sandbox-name-with-many-parts", "Ünïcode name", "x_y.z"])
    func fitsTheKernelLimitAndIsStable(_ name: String) {
        let tap = TapName.forSandbox(name)
        #expect(tap.utf8.count <= TapName.maximumLength)
        #expect(tap.hasPrefix("kh"))
        #expect(tap == TapName.forSandbox(name))
        #expect(tap.utf8.allSatisfy { ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2D })
    }

    @Test func distinctNamesSharingAPrefixGetDistinctTAPs() {
        #expect(TapName.forSandbox("worker-one") != TapName.forSandbox("worker-two"))
    }
}
