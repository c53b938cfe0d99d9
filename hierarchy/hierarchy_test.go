package hierarchy_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
	"github.com/kubekms/kubekms/keyservice/softkey"
)

// clock is a settable test clock.
type clock struct{ ns atomic.Int64 }

func newClock() *clock {
	c := &clock{}
	c.ns.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	return c
}
func (c *clock) Now() time.Time      { return time.Unix(0, c.ns.Load()) }
func (c *clock) Add(d time.Duration) { c.ns.Add(int64(d)) }

type fixture struct {
	path  string
	svc   *keyservicetest.Counting
	clock *clock
	state hierarchy.FileState
}

func newFixture(t testing.TB) *fixture {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "keyring.json")
	svc, err := softkey.Open(context.Background(), "softkey://"+path, keyservice.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() }) // stops its keyring watch
	return &fixture{path: path, svc: keyservicetest.NewCounting(svc), clock: newClock(),
		state: hierarchy.FileState{Path: filepath.Join(dir, "state.json")}}
}

func (f *fixture) config() hierarchy.Config {
	return hierarchy.Config{Now: f.clock.Now, ProbeInterval: time.Hour, RevocationBound: time.Hour, OutageGrace: 2 * time.Hour}
}

func (f *fixture) open(t testing.TB, cfg hierarchy.Config) *hierarchy.Hierarchy {
	t.Helper()
	h, err := hierarchy.New(context.Background(), f.svc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

var seed = bytes.Repeat([]byte{0x42}, 32)

func encrypt(t testing.TB, h *hierarchy.Hierarchy) hierarchy.Sealed {
	t.Helper()
	s, err := h.Encrypt(context.Background(), seed)
	if err != nil {
		t.Fatalf("Encrypt: %v", err)
	}
	return s
}

func decrypt(t *testing.T, h *hierarchy.Hierarchy, s hierarchy.Sealed) {
	t.Helper()
	got, err := h.Decrypt(context.Background(), s.KeyID, s.Ciphertext, s.Annotations)
	if err != nil {
		t.Fatalf("Decrypt: %v", err)
	}
	if !bytes.Equal(got, seed) {
		t.Fatal("Decrypt returned other bytes")
	}
}

func TestRoundTripAndNoRemoteCallPerOperation(t *testing.T) {
	f := newFixture(t)
	h := f.open(t, f.config())
	if f.svc.Calls("wrap") != 1 {
		t.Fatalf("start-up made %d wraps, want 1 (first local KEK at start-up)", f.svc.Calls("wrap"))
	}
	for range 1000 {
		decrypt(t, h, encrypt(t, h))
	}
	if got := f.svc.Crypto(); got != 1 {
		t.Fatalf("1000 round trips made %d remote crypto calls, want 1", got)
	}
	s := encrypt(t, h)
	kek := s.LocalKEK()
	if len(kek) == 0 || s.Annotations != nil || s.Ciphertext[0] != 3 ||
		len(s.Ciphertext) != 3+len(kek)+hierarchy.SealOverhead-1+len(seed) {
		t.Fatalf("ciphertext layout: %d bytes, version %d, %d-byte local KEK, annotations %v",
			len(s.Ciphertext), s.Ciphertext[0], len(kek), s.Annotations)
	}
	if bytes.Contains(s.Ciphertext, seed) {
		t.Fatal("ciphertext contains the plaintext")
	}
}

// TestSealFormats: format 3 (the default) carries the local KEK inside the
// ciphertext and no annotation; SealFormat 2 writes what plugins before
// format 3 read; one hierarchy reads both; a seal too large for format 3
// falls back to format 2; any other format is refused at New.
func TestSealFormats(t *testing.T) {
	f := newFixture(t)
	cfg := f.config()
	cfg.SealFormat = hierarchy.SealFormatAnnotation
	h2 := f.open(t, cfg)
	s2 := encrypt(t, h2)
	if s2.Ciphertext[0] != 2 || len(s2.Ciphertext) != hierarchy.SealOverhead+len(seed) ||
		!bytes.Equal(s2.Annotations[hierarchy.AnnotationKey], s2.LocalKEK()) {
		t.Fatalf("format 2: version %d, %d bytes, annotations %v", s2.Ciphertext[0], len(s2.Ciphertext), s2.Annotations)
	}
	h3 := f.open(t, f.config())
	s3 := encrypt(t, h3)
	for _, h := range []*hierarchy.Hierarchy{h2, h3} {
		decrypt(t, h, s2)
		decrypt(t, h, s3)
	}
	// The largest plaintext does not fit format 3 with the local KEK: format 2.
	big := bytes.Repeat([]byte{7}, hierarchy.MaxPlaintext)
	sb, err := h3.Encrypt(context.Background(), big)
	if err != nil {
		t.Fatal(err)
	}
	if sb.Ciphertext[0] != 2 || len(sb.Ciphertext) > hierarchy.MaxCiphertext || sb.Annotations == nil {
		t.Fatalf("oversized for format 3: version %d, %d bytes", sb.Ciphertext[0], len(sb.Ciphertext))
	}
	if got, err := h2.Decrypt(context.Background(), sb.KeyID, sb.Ciphertext, sb.Annotations); err != nil || !bytes.Equal(got, big) {
		t.Fatalf("fallback seal: %v", err)
	}
	// A wrapped local KEK too large for format 3 (a TPM's wrap for six or
	// more nodes): every seal under it is format 2, and reads back.
	hw := f.open(t, hierarchy.Config{})
	wide, err := hierarchy.New(context.Background(), paddedWraps{f.svc, 900}, f.config())
	if err != nil {
		t.Fatal(err)
	}
	defer wide.Close()
	sw := encrypt(t, wide)
	if sw.Ciphertext[0] != 2 || len(sw.LocalKEK()) < 900 {
		t.Fatalf("a %d-byte local KEK: format %d", len(sw.LocalKEK()), sw.Ciphertext[0])
	}
	decrypt(t, wide, sw)
	if _, err := hw.Decrypt(context.Background(), sw.KeyID, sw.Ciphertext, sw.Annotations); err == nil {
		t.Fatal("a padded wrap opened without the padding service") // the padding is really in the wrapped bytes
	}
	for _, bad := range []int{1, 4, -1} {
		cfg := f.config()
		cfg.SealFormat = bad
		if h, err := hierarchy.New(context.Background(), f.svc, cfg); err == nil {
			h.Close()
			t.Errorf("SealFormat %d accepted", bad)
		}
	}
}

// paddedWraps makes the wrapped local KEKs of a key service n bytes longer,
// as a key service with large wraps (TPM for many nodes, RSA-8192) would.
type paddedWraps struct {
	keyservice.Service
	n int
}

func (p paddedWraps) Wrap(ctx context.Context, key []byte) (keyservice.WrapResult, error) {
	r, err := p.Service.Wrap(ctx, key)
	r.Wrapped = append(r.Wrapped, make([]byte, p.n)...)
	return r, err
}

func (p paddedWraps) Unwrap(ctx context.Context, keyID string, wrapped []byte) ([]byte, error) {
	if len(wrapped) < p.n {
		return nil, keyservice.Invalid("unwrap", errors.New("wrapped local KEK shorter than its padding"))
	}
	return p.Service.Unwrap(ctx, keyID, wrapped[:len(wrapped)-p.n])
}

type tamperCase struct {
	keyID string
	ct    []byte
	ann   map[string][]byte
}

func flip(b []byte, i int) []byte { b = bytes.Clone(b); b[i] ^= 1; return b }

func TestTamperingIsRefused(t *testing.T) {
	f := newFixture(t)
	refused := func(t *testing.T, h *hierarchy.Hierarchy, cases map[string]tamperCase) {
		for name, tc := range cases {
			t.Run(name, func(t *testing.T) {
				got, err := h.Decrypt(context.Background(), tc.keyID, tc.ct, tc.ann)
				if err == nil {
					t.Fatalf("Decrypt accepted it (%d bytes)", len(got))
				}
				if !errors.Is(err, hierarchy.ErrBadRequest) && keyservice.Classify(err) != keyservice.ClassInvalid {
					t.Fatalf("error %v is neither a bad request nor invalid input", err)
				}
				if bytes.Contains([]byte(err.Error()), seed) {
					t.Fatal("error contains the plaintext")
				}
			})
		}
	}
	common := func(s hierarchy.Sealed) map[string]tamperCase {
		return map[string]tamperCase{
			"ciphertext bit":       {s.KeyID, flip(s.Ciphertext, len(s.Ciphertext)-1), s.Annotations},
			"nonce bit":            {s.KeyID, flip(s.Ciphertext, len(s.Ciphertext)-len(seed)-17), s.Annotations},
			"unknown version":      {s.KeyID, append([]byte{9}, s.Ciphertext[1:]...), s.Annotations},
			"empty ciphertext":     {s.KeyID, nil, s.Annotations},
			"oversized ciphertext": {s.KeyID, append(bytes.Clone(s.Ciphertext), make([]byte, 1024)...), s.Annotations},
			"truncated ciphertext": {s.KeyID, s.Ciphertext[:10], s.Annotations},
			"key_id changed":       {s.KeyID + "x", s.Ciphertext, s.Annotations},
			"empty key_id":         {"", s.Ciphertext, s.Annotations},
		}
	}
	t.Run("format 2", func(t *testing.T) {
		cfg := f.config()
		cfg.SealFormat = hierarchy.SealFormatAnnotation
		h := f.open(t, cfg)
		s := encrypt(t, h)
		other := encrypt(t, f.open(t, cfg)) // another local KEK, same remote key
		ann := s.Annotations[hierarchy.AnnotationKey]
		cases := common(s)
		for name, tc := range map[string]tamperCase{
			"missing annotation": {s.KeyID, s.Ciphertext, nil},
			"annotation created": {s.KeyID, s.Ciphertext, map[string][]byte{hierarchy.AnnotationKey: flip(ann, 5)}},
			"annotation wrapped": {s.KeyID, s.Ciphertext, map[string][]byte{hierarchy.AnnotationKey: flip(ann, len(ann)-1)}},
			"annotation version": {s.KeyID, s.Ciphertext, map[string][]byte{hierarchy.AnnotationKey: flip(ann, 0)}},
			"swapped annotation": {s.KeyID, s.Ciphertext, other.Annotations},
			"empty annotation":   {s.KeyID, s.Ciphertext, map[string][]byte{hierarchy.AnnotationKey: {}}},
			// Format 2's seal with its local KEK moved inside, as format 3.
			"moved into the ciphertext": {s.KeyID, inline(ann, s.Ciphertext[1:]), nil},
		} {
			cases[name] = tc
		}
		refused(t, h, cases)
	})
	t.Run("format 3", func(t *testing.T) {
		h := f.open(t, f.config())
		s := encrypt(t, h)
		other := encrypt(t, f.open(t, f.config()))
		kek, okek := s.LocalKEK(), other.LocalKEK()
		seal := s.Ciphertext[3+len(kek):]
		cases := common(s)
		for name, tc := range map[string]tamperCase{
			"local KEK created":   {s.KeyID, flip(s.Ciphertext, 3+5), nil},
			"local KEK wrapped":   {s.KeyID, flip(s.Ciphertext, 3+len(kek)-1), nil},
			"local KEK version":   {s.KeyID, flip(s.Ciphertext, 3), nil},
			"local KEK length":    {s.KeyID, flip(s.Ciphertext, 2), nil},
			"local KEK too long":  {s.KeyID, append([]byte{3, 0xff, 0xff}, s.Ciphertext[3:]...), nil},
			"empty local KEK":     {s.KeyID, inline(nil, seal), nil},
			"swapped local KEK":   {s.KeyID, inline(okek, seal), nil},
			"annotation as well":  {s.KeyID, s.Ciphertext, map[string][]byte{hierarchy.AnnotationKey: kek}},
			"moved to annotation": {s.KeyID, append([]byte{2}, seal...), map[string][]byte{hierarchy.AnnotationKey: kek}},
		} {
			cases[name] = tc
		}
		refused(t, h, cases)
	})
	h := f.open(t, f.config())
	for name, p := range map[string][]byte{"empty": nil, "oversized": make([]byte, hierarchy.MaxPlaintext+1)} {
		if _, err := h.Encrypt(context.Background(), p); !errors.Is(err, hierarchy.ErrBadRequest) {
			t.Errorf("Encrypt %s plaintext: %v, want a bad request", name, err)
		}
	}
	if _, err := h.Encrypt(context.Background(), make([]byte, hierarchy.MaxPlaintext)); err != nil {
		t.Errorf("Encrypt of the largest plaintext: %v", err)
	}
}

func TestRotationLimits(t *testing.T) {
	f := newFixture(t)
	cfg := f.config()
	cfg.MaxUses = 5
	cfg.MaxAge = 24 * time.Hour
	h := f.open(t, cfg)
	first := encrypt(t, h)
	for range 4 {
		if s := encrypt(t, h); !bytes.Equal(s.LocalKEK(), first.LocalKEK()) {
			t.Fatal("new local KEK before MaxUses")
		}
	}
	afterUses := encrypt(t, h)
	if bytes.Equal(afterUses.LocalKEK(), first.LocalKEK()) {
		t.Fatal("no new local KEK after MaxUses")
	}
	f.clock.Add(25 * time.Hour)
	afterAge := encrypt(t, h)
	if bytes.Equal(afterAge.LocalKEK(), afterUses.LocalKEK()) {
		t.Fatal("no new local KEK after MaxAge")
	}
	for _, s := range []hierarchy.Sealed{first, afterUses, afterAge} {
		decrypt(t, h, s)
	}
}

func TestRemoteRotationChangesKeyID(t *testing.T) {
	f := newFixture(t)
	h := f.open(t, f.config())
	before := h.Status(context.Background())
	old := encrypt(t, h)
	if !before.OK || before.KeyID != old.KeyID {
		t.Fatalf("status %+v, encrypt key ID %q", before, old.KeyID)
	}
	if _, err := softkey.Rotate(f.path); err != nil {
		t.Fatal(err)
	}
	probes := f.svc.Calls("probe")
	if st := h.Status(context.Background()); st.KeyID != before.KeyID || f.svc.Calls("probe") != probes {
		t.Fatalf("Status probed again within ProbeInterval (key ID %q)", st.KeyID)
	}
	f.clock.Add(time.Hour)
	after := h.Status(context.Background())
	if !after.OK || after.KeyID == before.KeyID {
		t.Fatalf("after rotation: %+v", after)
	}
	s := encrypt(t, h)
	if s.KeyID != after.KeyID {
		t.Fatalf("Encrypt after rotation used %q, Status says %q", s.KeyID, after.KeyID)
	}
	decrypt(t, h, old)
	decrypt(t, h, s)
}

func TestOutageGrace(t *testing.T) {
	f := newFixture(t)
	h := f.open(t, f.config())
	s := encrypt(t, h)
	if err := os.Rename(f.path, f.path+".away"); err != nil {
		t.Fatal(err)
	}
	f.clock.Add(time.Hour) // stale probe: Status probes and fails
	st := h.Status(context.Background())
	if !st.OK || st.Reason == "" {
		t.Fatalf("within grace: %+v, want ok with a note", st)
	}
	decrypt(t, h, s)             // cached KEK
	decrypt(t, h, encrypt(t, h)) // current KEK
	f.clock.Add(90 * time.Minute)
	st = h.Status(context.Background())
	if st.OK {
		t.Fatalf("after grace: %+v, want not ok", st)
	}
	if err := os.Rename(f.path+".away", f.path); err != nil {
		t.Fatal(err)
	}
	f.clock.Add(time.Hour)
	if st := h.Status(context.Background()); !st.OK || st.Reason != "" {
		t.Fatalf("after recovery: %+v", st)
	}
}

func TestRevocationShredsCache(t *testing.T) {
	f := newFixture(t)
	h := f.open(t, f.config())
	s := encrypt(t, h)
	setDisabled(t, f.path, true)
	f.clock.Add(time.Hour)
	if st := h.Status(context.Background()); st.OK {
		t.Fatalf("revoked key: %+v, want not ok", st)
	}
	if _, err := h.Decrypt(context.Background(), s.KeyID, s.Ciphertext, s.Annotations); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("Decrypt with a revoked key: %v, want revoked (cached KEK must be dropped)", err)
	}
	if _, err := h.Encrypt(context.Background(), seed); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("Encrypt with a revoked key: %v, want revoked", err)
	}
	setDisabled(t, f.path, false)
	f.clock.Add(time.Hour)
	if st := h.Status(context.Background()); !st.OK {
		t.Fatalf("re-enabled: %+v", st)
	}
	decrypt(t, h, s)
	decrypt(t, h, encrypt(t, h))
}

// TestRevocationWithinBound uses the real clock: the background loop must drop
// cached KEKs within RevocationBound without any Status call.
func TestRevocationWithinBound(t *testing.T) {
	f := newFixture(t)
	h := f.open(t, hierarchy.Config{ProbeInterval: time.Hour, RevocationBound: 50 * time.Millisecond})
	s := encrypt(t, h)
	setDisabled(t, f.path, true)
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := h.Decrypt(context.Background(), s.KeyID, s.Ciphertext, s.Annotations)
		if keyservice.Classify(err) == keyservice.ClassRevoked {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("cached KEK still decrypts 5 s after revocation (err %v)", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func setDisabled(t *testing.T, path string, disabled bool) {
	t.Helper()
	ring, err := softkey.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range ring.Versions {
		if _, err := softkey.SetDisabled(path, v.Version, disabled); err != nil {
			t.Fatal(err)
		}
	}
}

func TestTransientErrorsAreRetried(t *testing.T) {
	f := newFixture(t)
	h := f.open(t, f.config())
	f.clock.Add(time.Hour)
	f.svc.FailNext(2, keyservice.Transient("probe", errors.New("connection refused")))
	if st := h.Status(context.Background()); !st.OK || st.Reason != "" {
		t.Fatalf("after two transient failures: %+v, want ok (retried)", st)
	}
	s := encrypt(t, h)
	h2 := f.open(t, f.config())
	f.svc.FailNext(1, keyservice.Invalid("unwrap", errors.New("bad")))
	before := f.svc.Calls("unwrap")
	if _, err := h2.Decrypt(context.Background(), s.KeyID, s.Ciphertext, s.Annotations); err == nil {
		t.Fatal("an invalid-input error was hidden")
	}
	if n := f.svc.Calls("unwrap") - before; n != 1 {
		t.Fatalf("invalid-input error was tried %d times, want 1 (not retried)", n)
	}
}

func TestStateRestoresLocalKEK(t *testing.T) {
	f := newFixture(t)
	cfg := f.config()
	cfg.State = f.state
	h1 := f.open(t, cfg)
	s := encrypt(t, h1)
	h1.Close()
	h2 := f.open(t, cfg)
	if f.svc.Calls("wrap") != 1 || f.svc.Calls("unwrap") != 1 {
		t.Fatalf("restart made %d wraps and %d unwraps, want 1 and 1", f.svc.Calls("wrap"), f.svc.Calls("unwrap"))
	}
	s2 := encrypt(t, h2)
	if !bytes.Equal(s.LocalKEK(), s2.LocalKEK()) {
		t.Fatal("restored hierarchy uses another local KEK")
	}
	decrypt(t, h2, s)
	if f.svc.Crypto() != 2 {
		t.Fatalf("%d remote crypto calls, want 2", f.svc.Crypto())
	}
	// An edited state file is refused: a new KEK is made instead.
	st, err := f.state.Load(context.Background())
	if err != nil || st == nil {
		t.Fatalf("state: %v", err)
	}
	st.UsesReserved = 0
	if err := f.state.Save(context.Background(), *st); err != nil {
		t.Fatal(err)
	}
	h3 := f.open(t, cfg)
	if s3 := encrypt(t, h3); bytes.Equal(s3.LocalKEK(), s.LocalKEK()) {
		t.Fatal("a tampered state file was trusted")
	}
	// After a remote rotation the saved KEK is not reused for new seals.
	if _, err := softkey.Rotate(f.path); err != nil {
		t.Fatal(err)
	}
	h4 := f.open(t, cfg)
	if s4 := encrypt(t, h4); s4.KeyID == s.KeyID {
		t.Fatal("restored a local KEK of an old remote key")
	}
}

func TestConcurrentUse(t *testing.T) {
	f := newFixture(t)
	cfg := f.config()
	cfg.MaxUses = 50
	h := f.open(t, cfg)
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 200 {
				s, err := h.Encrypt(context.Background(), seed)
				if err != nil {
					t.Error(err)
					return
				}
				if _, err := h.Decrypt(context.Background(), s.KeyID, s.Ciphertext, s.Annotations); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

func TestStartsWhileKeyServiceIsDown(t *testing.T) {
	f := newFixture(t)
	if err := os.Rename(f.path, f.path+".away"); err != nil {
		t.Fatal(err)
	}
	h := f.open(t, f.config())
	if st := h.Status(context.Background()); st.OK {
		t.Fatalf("not ready: %+v", st)
	}
	if _, err := h.Encrypt(context.Background(), seed); err == nil {
		t.Fatal("Encrypt without a local KEK succeeded")
	}
	if err := os.Rename(f.path+".away", f.path); err != nil {
		t.Fatal(err)
	}
	f.clock.Add(time.Hour)
	if st := h.Status(context.Background()); !st.OK {
		t.Fatalf("after the key service came back: %+v", st)
	}
	decrypt(t, h, encrypt(t, h))
}

// TestRevokedOldVersionIsShredded: disabling one old key version (the key
// itself stays usable) drops the cached local KEKs it wrapped within the
// revocation bound, without any cache miss.
func TestRevokedOldVersionIsShredded(t *testing.T) {
	f := newFixture(t)
	// The raw service: the counting wrapper would hide its VersionChecker.
	h, err := hierarchy.New(context.Background(), f.svc.Service, hierarchy.Config{ProbeInterval: time.Hour, RevocationBound: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	old := encrypt(t, h)
	if _, err := softkey.Rotate(f.path); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	var fresh hierarchy.Sealed
	for {
		fresh = encrypt(t, h)
		if fresh.KeyID != old.KeyID {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("rotation not picked up")
		}
		time.Sleep(20 * time.Millisecond)
	}
	ring, err := softkey.Load(f.path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := softkey.SetDisabled(f.path, ring.Versions[0].Version, true); err != nil {
		t.Fatal(err)
	}
	for {
		_, err := h.Decrypt(context.Background(), old.KeyID, old.Ciphertext, old.Annotations)
		if keyservice.Classify(err) == keyservice.ClassRevoked {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("data under the disabled version still decrypts (err %v)", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	decrypt(t, h, fresh) // the current version is untouched
}

// TestStateUseReservationSurvivesRestart: the saved use count is reserved
// ahead of the seals, so a restart never resets a local KEK's count. With
// MaxUses 100,000, after 70,000 seals the saved reservation (131,072) is over
// the bound and the restarted hierarchy makes a new local KEK instead of
// restoring one that could then seal 100,000 more.
func TestStateUseReservationSurvivesRestart(t *testing.T) {
	f := newFixture(t)
	cfg := f.config()
	cfg.State = f.state
	cfg.MaxUses = 100_000
	h1 := f.open(t, cfg)
	var first hierarchy.Sealed
	for i := range 70_000 {
		s := encrypt(t, h1)
		if i == 0 {
			first = s
		}
	}
	h1.Close()
	h2 := f.open(t, cfg)
	s := encrypt(t, h2)
	if bytes.Equal(s.LocalKEK(), first.LocalKEK()) {
		t.Fatal("a restart restored a local KEK that had used 70,000 of 100,000 seals as if it had used 65,536 or fewer")
	}
	decrypt(t, h2, first)
}

// inline builds a format-3 ciphertext from an encoded local KEK and a seal.
func inline(kek, seal []byte) []byte {
	out := append([]byte{3, byte(len(kek) >> 8), byte(len(kek))}, kek...)
	return append(out, seal...)
}
