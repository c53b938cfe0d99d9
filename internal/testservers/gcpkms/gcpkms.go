// Package gcpkms is a STAND-IN for Google Cloud KMS, for tests: no emulator
// of Cloud KMS exists and the real service cannot be reached from here.
//
// It is an in-process gRPC server on 127.0.0.1 implementing the official
// google.cloud.kms.v1.KeyManagementService (the kmspb types the official
// client uses), for the methods kubekms and its tests call: GetCryptoKey,
// GetCryptoKeyVersion, CreateCryptoKeyVersion, UpdateCryptoKeyPrimaryVersion,
// UpdateCryptoKeyVersion (state), DestroyCryptoKeyVersion,
// RestoreCryptoKeyVersion, Encrypt and Decrypt. Encryption is real
// AES-256-GCM with one random key per CryptoKeyVersion, the AAD authenticated,
// CRC32C checksums checked and returned as Cloud KMS does; status codes and
// messages follow Cloud KMS's documented behaviour. What it does not do: IAM
// (Deny switches every call to PermissionDenied), key rings, locations,
// quotas, and Cloud KMS's own ciphertext format.
package gcpkms

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	kms "cloud.google.com/go/kms/apiv1"
	"cloud.google.com/go/kms/apiv1/kmspb"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/fieldmaskpb"
	"google.golang.org/protobuf/types/known/timestamppb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// KeyRing is the key ring every seeded key lives in.
const KeyRing = "projects/kubekms-test/locations/europe-west2/keyRings/kubekms"

// Server is one stand-in Cloud KMS.
type Server struct {
	addr string

	mu      sync.Mutex
	keys    map[string]*cryptoKey // by CryptoKey resource name
	deny    bool
	calls   map[string]int
	srv     *grpc.Server
	stopped bool
}

type cryptoKey struct {
	pb       *kmspb.CryptoKey
	versions []*version // versions[i] is version i+1
}

type version struct {
	pb   *kmspb.CryptoKeyVersion
	aead cipher.AEAD
}

// Start seeds the CryptoKeys named (short names under KeyRing), each with
// one enabled primary version, and serves on a free 127.0.0.1 port until t
// ends.
func Start(t testing.TB, keys ...string) *Server {
	t.Helper()
	s := &Server{keys: map[string]*cryptoKey{}, calls: map[string]int{}}
	for _, k := range keys {
		name := KeyRing + "/cryptoKeys/" + k
		ck := &cryptoKey{pb: &kmspb.CryptoKey{
			Name: name, Purpose: kmspb.CryptoKey_ENCRYPT_DECRYPT, CreateTime: timestamppb.Now(),
			VersionTemplate: &kmspb.CryptoKeyVersionTemplate{Algorithm: kmspb.CryptoKeyVersion_GOOGLE_SYMMETRIC_ENCRYPTION},
		}}
		ck.pb.Primary = ck.newVersion(t).pb
		s.keys[name] = ck
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.addr = l.Addr().String()
	s.serve(l)
	t.Cleanup(s.stop)
	return s
}

// KeyName is the resource name of a seeded key.
func KeyName(short string) string { return KeyRing + "/cryptoKeys/" + short }

// Addr is host:port.
func (s *Server) Addr() string { return s.addr }

// Endpoint is the kubekms key-URI option value for this server (plaintext
// gRPC on loopback, no credentials).
func (s *Server) Endpoint() string { return "http://" + s.addr }

func (s *Server) serve(l net.Listener) {
	g := grpc.NewServer()
	kmspb.RegisterKeyManagementServiceServer(g, &handler{s: s})
	s.mu.Lock()
	s.srv, s.stopped = g, false
	s.mu.Unlock()
	go func() { _ = g.Serve(l) }()
}

func (s *Server) stop() {
	s.mu.Lock()
	g := s.srv
	s.stopped = true
	s.mu.Unlock()
	if g != nil {
		g.Stop()
	}
}

// Stop makes the server unreachable (its listener closed, connections cut).
func (s *Server) Stop(t testing.TB) { s.stop() }

// Start serves again on the same address.
func (s *Server) Start(t testing.TB) {
	t.Helper()
	var l net.Listener
	var err error
	for i := 0; i < 50; i++ {
		if l, err = net.Listen("tcp", s.addr); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("stand-in Cloud KMS restart on %s: %v", s.addr, err)
	}
	s.serve(l)
}

// Deny makes every call fail with PermissionDenied (an IAM binding removed).
func (s *Server) Deny(deny bool) {
	s.mu.Lock()
	s.deny = deny
	s.mu.Unlock()
}

// Calls returns how often method (e.g. "Encrypt") was called.
func (s *Server) Calls(method string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls[method]
}

// AdminClient is the official client on this server, for the tests'
// administrative calls (rotation, disabling versions).
func (s *Server) AdminClient(t testing.TB) *kms.KeyManagementClient {
	t.Helper()
	c, err := kms.NewKeyManagementClient(context.Background(), ClientOptions(s.addr)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// ClientOptions reach addr with plaintext gRPC and no credentials.
func ClientOptions(addr string) []option.ClientOption {
	return []option.ClientOption{
		option.WithEndpoint(addr), option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())),
	}
}

func (ck *cryptoKey) newVersion(t testing.TB) *version {
	v, err := ck.addVersion()
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func (ck *cryptoKey) addVersion() (*version, error) {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	n := len(ck.versions) + 1
	v := &version{aead: aead, pb: &kmspb.CryptoKeyVersion{
		Name:            ck.pb.Name + "/cryptoKeyVersions/" + strconv.Itoa(n),
		State:           kmspb.CryptoKeyVersion_ENABLED,
		Algorithm:       kmspb.CryptoKeyVersion_GOOGLE_SYMMETRIC_ENCRYPTION,
		ProtectionLevel: kmspb.ProtectionLevel_SOFTWARE,
		CreateTime:      timestamppb.Now(),
	}}
	ck.versions = append(ck.versions, v)
	return v, nil
}

type handler struct {
	kmspb.UnimplementedKeyManagementServiceServer
	s *Server
}

// enter counts the call, takes the lock and applies the IAM switch.
func (h *handler) enter(method string) (unlock func(), err error) {
	h.s.mu.Lock()
	h.s.calls[method]++
	if h.s.deny {
		h.s.mu.Unlock()
		return nil, status.Errorf(codes.PermissionDenied, "Permission 'cloudkms.cryptoKeyVersions.use%s' denied on resource (or it may not exist).", method)
	}
	return h.s.mu.Unlock, nil
}

func (h *handler) key(name string) (*cryptoKey, error) {
	ck := h.s.keys[name]
	if ck == nil {
		return nil, status.Errorf(codes.NotFound, "%s not found.", name)
	}
	return ck, nil
}

// versionOf resolves a CryptoKeyVersion resource name.
func (h *handler) versionOf(name string) (*cryptoKey, *version, error) {
	keyName, n, ok := strings.Cut(name, "/cryptoKeyVersions/")
	if !ok {
		return nil, nil, status.Errorf(codes.InvalidArgument, "%s is not a CryptoKeyVersion name.", name)
	}
	ck, err := h.key(keyName)
	if err != nil {
		return nil, nil, err
	}
	i, err := strconv.Atoi(n)
	if err != nil || i < 1 || i > len(ck.versions) {
		return nil, nil, status.Errorf(codes.NotFound, "%s not found.", name)
	}
	return ck, ck.versions[i-1], nil
}

func clone[M proto.Message](m M) M { return proto.Clone(m).(M) }

func (h *handler) GetCryptoKey(_ context.Context, r *kmspb.GetCryptoKeyRequest) (*kmspb.CryptoKey, error) {
	unlock, err := h.enter("GetCryptoKey")
	if err != nil {
		return nil, err
	}
	defer unlock()
	ck, err := h.key(r.GetName())
	if err != nil {
		return nil, err
	}
	return clone(ck.pb), nil
}

func (h *handler) GetCryptoKeyVersion(_ context.Context, r *kmspb.GetCryptoKeyVersionRequest) (*kmspb.CryptoKeyVersion, error) {
	unlock, err := h.enter("GetCryptoKeyVersion")
	if err != nil {
		return nil, err
	}
	defer unlock()
	_, v, err := h.versionOf(r.GetName())
	if err != nil {
		return nil, err
	}
	return clone(v.pb), nil
}

func (h *handler) CreateCryptoKeyVersion(_ context.Context, r *kmspb.CreateCryptoKeyVersionRequest) (*kmspb.CryptoKeyVersion, error) {
	unlock, err := h.enter("CreateCryptoKeyVersion")
	if err != nil {
		return nil, err
	}
	defer unlock()
	ck, err := h.key(r.GetParent())
	if err != nil {
		return nil, err
	}
	v, err := ck.addVersion()
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return clone(v.pb), nil
}

func (h *handler) UpdateCryptoKeyPrimaryVersion(_ context.Context, r *kmspb.UpdateCryptoKeyPrimaryVersionRequest) (*kmspb.CryptoKey, error) {
	unlock, err := h.enter("UpdateCryptoKeyPrimaryVersion")
	if err != nil {
		return nil, err
	}
	defer unlock()
	ck, v, err := h.versionOf(r.GetName() + "/cryptoKeyVersions/" + r.GetCryptoKeyVersionId())
	if err != nil {
		return nil, err
	}
	if v.pb.State != kmspb.CryptoKeyVersion_ENABLED {
		return nil, status.Errorf(codes.FailedPrecondition, "%s is not enabled.", v.pb.Name)
	}
	ck.pb.Primary = v.pb
	return clone(ck.pb), nil
}

// setState changes a version's state (the CryptoKey's primary field shares
// the message, so it shows the change).
func setState(v *version, st kmspb.CryptoKeyVersion_CryptoKeyVersionState) {
	v.pb.State = st
	if st == kmspb.CryptoKeyVersion_DESTROY_SCHEDULED {
		v.pb.DestroyTime = timestamppb.New(time.Now().Add(24 * time.Hour))
	} else {
		v.pb.DestroyTime = nil
	}
}

func (h *handler) UpdateCryptoKeyVersion(_ context.Context, r *kmspb.UpdateCryptoKeyVersionRequest) (*kmspb.CryptoKeyVersion, error) {
	unlock, err := h.enter("UpdateCryptoKeyVersion")
	if err != nil {
		return nil, err
	}
	defer unlock()
	if paths := r.GetUpdateMask().GetPaths(); len(paths) != 1 || paths[0] != "state" {
		return nil, status.Errorf(codes.InvalidArgument, "the stand-in updates only the state field, not %v", paths)
	}
	_, v, err := h.versionOf(r.GetCryptoKeyVersion().GetName())
	if err != nil {
		return nil, err
	}
	st := r.GetCryptoKeyVersion().GetState()
	if st != kmspb.CryptoKeyVersion_ENABLED && st != kmspb.CryptoKeyVersion_DISABLED {
		return nil, status.Errorf(codes.InvalidArgument, "state can only be set to ENABLED or DISABLED, not %s.", st)
	}
	if cur := v.pb.State; cur != kmspb.CryptoKeyVersion_ENABLED && cur != kmspb.CryptoKeyVersion_DISABLED {
		return nil, status.Errorf(codes.FailedPrecondition, "%s is %s.", v.pb.Name, cur)
	}
	setState(v, st)
	return clone(v.pb), nil
}

func (h *handler) DestroyCryptoKeyVersion(_ context.Context, r *kmspb.DestroyCryptoKeyVersionRequest) (*kmspb.CryptoKeyVersion, error) {
	unlock, err := h.enter("DestroyCryptoKeyVersion")
	if err != nil {
		return nil, err
	}
	defer unlock()
	_, v, err := h.versionOf(r.GetName())
	if err != nil {
		return nil, err
	}
	setState(v, kmspb.CryptoKeyVersion_DESTROY_SCHEDULED)
	return clone(v.pb), nil
}

func (h *handler) RestoreCryptoKeyVersion(_ context.Context, r *kmspb.RestoreCryptoKeyVersionRequest) (*kmspb.CryptoKeyVersion, error) {
	unlock, err := h.enter("RestoreCryptoKeyVersion")
	if err != nil {
		return nil, err
	}
	defer unlock()
	_, v, err := h.versionOf(r.GetName())
	if err != nil {
		return nil, err
	}
	if v.pb.State != kmspb.CryptoKeyVersion_DESTROY_SCHEDULED {
		return nil, status.Errorf(codes.FailedPrecondition, "%s is not scheduled for destruction.", v.pb.Name)
	}
	setState(v, kmspb.CryptoKeyVersion_DISABLED) // as Cloud KMS: restored versions are disabled
	return clone(v.pb), nil
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(b []byte) *wrapperspb.Int64Value {
	return wrapperspb.Int64(int64(crc32.Checksum(b, castagnoli)))
}

func checkCRC(field string, data []byte, sum *wrapperspb.Int64Value) error {
	if sum != nil && sum.GetValue() != crc(data).GetValue() {
		return status.Errorf(codes.InvalidArgument, "The checksum in field %s_crc32c did not match the data in field %s.", field, field)
	}
	return nil
}

// usable is Cloud KMS's FAILED_PRECONDITION for a version that is not enabled.
func usable(v *version) error {
	if v.pb.State != kmspb.CryptoKeyVersion_ENABLED {
		return status.Errorf(codes.FailedPrecondition, "The request cannot be fulfilled. Resource %s has value %s in field crypto_key_version.state.", v.pb.Name, v.pb.State)
	}
	return nil
}

// Ciphertext layout (the stand-in's own): version (4 bytes, big-endian) ||
// nonce (12) || AES-256-GCM(plaintext, AAD) || tag (16).
const header = 4

func (h *handler) Encrypt(_ context.Context, r *kmspb.EncryptRequest) (*kmspb.EncryptResponse, error) {
	unlock, err := h.enter("Encrypt")
	if err != nil {
		return nil, err
	}
	defer unlock()
	name := r.GetName()
	var ck *cryptoKey
	var v *version
	if strings.Contains(name, "/cryptoKeyVersions/") {
		ck, v, err = h.versionOf(name)
	} else if ck, err = h.key(name); err == nil {
		for _, x := range ck.versions {
			if x.pb.Name == ck.pb.GetPrimary().GetName() {
				v = x
			}
		}
		if v == nil {
			err = status.Errorf(codes.FailedPrecondition, "%s has no primary version.", name)
		}
	}
	if err != nil {
		return nil, err
	}
	if ck.pb.Purpose != kmspb.CryptoKey_ENCRYPT_DECRYPT {
		return nil, status.Errorf(codes.InvalidArgument, "%s does not have purpose ENCRYPT_DECRYPT.", name)
	}
	if err := usable(v); err != nil {
		return nil, err
	}
	if len(r.GetPlaintext()) > 64*1024 || len(r.GetAdditionalAuthenticatedData()) > 64*1024 {
		return nil, status.Error(codes.InvalidArgument, "plaintext or additional_authenticated_data is larger than 64 KiB.")
	}
	if err := checkCRC("plaintext", r.GetPlaintext(), r.GetPlaintextCrc32C()); err != nil {
		return nil, err
	}
	if err := checkCRC("additional_authenticated_data", r.GetAdditionalAuthenticatedData(), r.GetAdditionalAuthenticatedDataCrc32C()); err != nil {
		return nil, err
	}
	n, _ := strconv.Atoi(v.pb.Name[strings.LastIndex(v.pb.Name, "/")+1:])
	out := make([]byte, header+12, header+12+len(r.GetPlaintext())+16)
	binary.BigEndian.PutUint32(out, uint32(n))
	if _, err := rand.Read(out[header:]); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	out = v.aead.Seal(out, out[header:header+12], r.GetPlaintext(), r.GetAdditionalAuthenticatedData())
	return &kmspb.EncryptResponse{
		Name: v.pb.Name, Ciphertext: out, CiphertextCrc32C: crc(out),
		VerifiedPlaintextCrc32C:                   r.GetPlaintextCrc32C() != nil,
		VerifiedAdditionalAuthenticatedDataCrc32C: r.GetAdditionalAuthenticatedDataCrc32C() != nil,
		ProtectionLevel:                           v.pb.ProtectionLevel,
	}, nil
}

func (h *handler) Decrypt(_ context.Context, r *kmspb.DecryptRequest) (*kmspb.DecryptResponse, error) {
	unlock, err := h.enter("Decrypt")
	if err != nil {
		return nil, err
	}
	defer unlock()
	ck, err := h.key(r.GetName())
	if err != nil {
		return nil, err
	}
	if err := checkCRC("ciphertext", r.GetCiphertext(), r.GetCiphertextCrc32C()); err != nil {
		return nil, err
	}
	if err := checkCRC("additional_authenticated_data", r.GetAdditionalAuthenticatedData(), r.GetAdditionalAuthenticatedDataCrc32C()); err != nil {
		return nil, err
	}
	ct := r.GetCiphertext()
	invalid := status.Error(codes.InvalidArgument, "Decryption failed: the ciphertext is invalid.")
	if len(ct) < header+12+16 {
		return nil, invalid
	}
	n := int(binary.BigEndian.Uint32(ct))
	if n < 1 || n > len(ck.versions) {
		return nil, invalid
	}
	v := ck.versions[n-1]
	if err := usable(v); err != nil {
		return nil, err
	}
	plain, err := v.aead.Open(nil, ct[header:header+12], ct[header+12:], r.GetAdditionalAuthenticatedData())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, "Decryption failed: verify that 'name' refers to the correct CryptoKey.")
	}
	return &kmspb.DecryptResponse{
		Plaintext: plain, PlaintextCrc32C: crc(plain),
		UsedPrimary:     v.pb.Name == ck.pb.GetPrimary().GetName(),
		ProtectionLevel: v.pb.ProtectionLevel,
	}, nil
}

// String names the stand-in in test logs.
func (s *Server) String() string { return fmt.Sprintf("stand-in Cloud KMS on %s", s.addr) }

// Rotate is a Cloud KMS rotation through the official client: a new
// version of the seeded key short, made primary. It returns the version.
func (s *Server) Rotate(t testing.TB, short string) string {
	t.Helper()
	admin := s.AdminClient(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	v, err := admin.CreateCryptoKeyVersion(ctx, &kmspb.CreateCryptoKeyVersionRequest{Parent: KeyName(short), CryptoKeyVersion: &kmspb.CryptoKeyVersion{}})
	if err != nil {
		t.Fatalf("CreateCryptoKeyVersion: %v", err)
	}
	id := v.GetName()[strings.LastIndex(v.GetName(), "/")+1:]
	if _, err := admin.UpdateCryptoKeyPrimaryVersion(ctx, &kmspb.UpdateCryptoKeyPrimaryVersionRequest{Name: KeyName(short), CryptoKeyVersionId: id}); err != nil {
		t.Fatalf("UpdateCryptoKeyPrimaryVersion: %v", err)
	}
	return v.GetName()
}

// Primary returns the primary version of the seeded key short.
func (s *Server) Primary(t testing.TB, short string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ck, err := s.AdminClient(t).GetCryptoKey(ctx, &kmspb.GetCryptoKeyRequest{Name: KeyName(short)})
	if err != nil {
		t.Fatal(err)
	}
	return ck.GetPrimary().GetName()
}

// SetState enables or disables a version through the official client.
func (s *Server) SetState(t testing.TB, version string, st kmspb.CryptoKeyVersion_CryptoKeyVersionState) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := s.AdminClient(t).UpdateCryptoKeyVersion(ctx, &kmspb.UpdateCryptoKeyVersionRequest{
		CryptoKeyVersion: &kmspb.CryptoKeyVersion{Name: version, State: st},
		UpdateMask:       &fieldmaskpb.FieldMask{Paths: []string{"state"}},
	})
	if err != nil {
		t.Fatalf("UpdateCryptoKeyVersion %s: %v", st, err)
	}
}

// Versions lists the version names of the seeded key short, oldest first.
func (s *Server) Versions(short string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, v := range s.keys[KeyName(short)].versions {
		out = append(out, v.pb.Name)
	}
	return out
}
